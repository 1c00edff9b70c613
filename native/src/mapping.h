/* What other modules may ask of a Mapping object (mapping.c). */
#ifndef MMB_MAPPING_H
#define MMB_MAPPING_H

#include <node_api.h>
#include <stdbool.h>
#include <stdint.h>

/*
 * The address of [offset, offset + length) inside a live Mapping `v`. Throws (and returns false) for
 * anything that is not a Mapping (TypeError), an unmapped one (EINVAL) or a range outside it (ERANGE).
 * The pointer is valid only until control returns to JS. runs on the main thread
 */
bool mmb_mapping_range(napi_env env, napi_value v, uint64_t offset, uint64_t length, const char *syscall, uint8_t **addr);

#endif
