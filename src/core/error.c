/* Error strings, version and build features: the table-driven parts of the
 * public API (the error table is NQ_ERRNO_MAP in nq.h). */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include "nq.h"

const char *nq_strerror(int err) {
    switch (err) {
#define NQ__STRERROR(name, value, msg) \
    case NQ_##name:                     \
        return msg;
        NQ_ERRNO_MAP(NQ__STRERROR)
#undef NQ__STRERROR
    default:
        return "unknown error";
    }
}

const char *nq_err_name(int err) {
    switch (err) {
#define NQ__ERR_NAME(name, value, msg) \
    case NQ_##name:                     \
        return "NQ_" #name;
        NQ_ERRNO_MAP(NQ__ERR_NAME)
#undef NQ__ERR_NAME
    default:
        return "NQ_UNKNOWN";
    }
}

unsigned nq_version(void) { return NQ_VERSION_HEX; }

const char *nq_version_string(void) { return NQ_VERSION_STRING; }

unsigned nq_features(void) {
    unsigned f = 0;
#ifdef NQ_WITH_JEMALLOC
    f |= NQ_FEATURE_JEMALLOC;
#endif
#ifdef __linux__
    f |= NQ_FEATURE_FUTEX;
#endif
    return f;
}
