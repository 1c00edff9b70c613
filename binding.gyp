{
  "targets": [
    {
      "target_name": "mmb_native",
      "sources": [
        "native/src/addon.c",
        "native/src/async_work.c",
        "native/src/bitmap.c",
        "native/src/constants.c",
        "native/src/convert.c",
        "native/src/errors.c",
        "native/src/eventfd.c",
        "native/src/ioctl_gate.c",
        "native/src/kvm.c",
        "native/src/mapping.c",
        "native/src/memfd.c",
        "native/src/notify.c",
        "native/src/poll.c",
        "native/src/scm.c",
        "native/src/socket.c",
        "native/src/vfio.c"
      ],
      "cflags": [ "-std=gnu11", "-Wall", "-Wextra", "-O2" ],
      "cflags!": [ "-O3" ],
      "defines": [ "NAPI_VERSION=8", "_GNU_SOURCE" ]
    }
  ]
}
