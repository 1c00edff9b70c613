/* Descriptor passing over Unix stream sockets (SCM_RIGHTS). */
#ifndef MMB_SCM_H
#define MMB_SCM_H

/*
 * The kernel's cap on descriptors in one SCM_RIGHTS message (SCM_MAX_FD in include/net/scm.h; not
 * exported to user space). More fail with EINVAL from the kernel; we refuse with E2BIG first.
 */
#define MMB_SCM_MAX_FD 253

#endif
