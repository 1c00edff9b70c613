{
  "targets": [
    {
      "target_name": "mmb_native",
      "sources": [ "native/src/addon.c" ],
      "cflags": [ "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-O2" ],
      "defines": [ "NAPI_VERSION=8", "_GNU_SOURCE" ]
    }
  ]
}
