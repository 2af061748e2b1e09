/* libnq version numbers. Part of the public API; included by <nq.h>. */
#ifndef NQ_VERSION_H
#define NQ_VERSION_H

#define NQ_VERSION_MAJOR 0
#define NQ_VERSION_MINOR 1
#define NQ_VERSION_PATCH 0

/* 0xMMmmpp: compare with `#if NQ_VERSION_HEX >= 0x000100`. */
#define NQ_VERSION_HEX \
    ((NQ_VERSION_MAJOR << 16) | (NQ_VERSION_MINOR << 8) | (NQ_VERSION_PATCH))

#define NQ__STRINGIFY_HELPER(v) #v
#define NQ__STRINGIFY(v) NQ__STRINGIFY_HELPER(v)
#define NQ_VERSION_STRING                 \
    NQ__STRINGIFY(NQ_VERSION_MAJOR) "."   \
    NQ__STRINGIFY(NQ_VERSION_MINOR) "."   \
    NQ__STRINGIFY(NQ_VERSION_PATCH)

#endif /* NQ_VERSION_H */
