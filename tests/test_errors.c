/* Criterion suite "errors": the error table (NQ_ERRNO_MAP) and the two
 * functions generated from it, and bad input to every public function: NULL,
 * zero, absurd sizes, garbage and stale handles, double close. */
#include <criterion/criterion.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <string.h>

#include "nq.h"

/* The table, three ways: the codes, the names and the messages, in order. */
static const int codes[] = {
#define XX(name, value, msg) NQ_##name,
    NQ_ERRNO_MAP(XX)
#undef XX
};
static const char *const names[] = {
#define XX(name, value, msg) "NQ_" #name,
    NQ_ERRNO_MAP(XX)
#undef XX
};
static const char *const msgs[] = {
#define XX(name, value, msg) msg,
    NQ_ERRNO_MAP(XX)
#undef XX
};
#define NCODES (sizeof(codes) / sizeof(codes[0]))

Test(errors, every_code_is_negative_and_distinct) {
    cr_assert_eq(NCODES, 11, "the fixed API has 11 codes");
    cr_assert_eq(NQ_OK, 0);
    for (size_t i = 0; i < NCODES; i++) {
        cr_assert_lt(codes[i], 0, "%s is not negative", names[i]);
        for (size_t j = i + 1; j < NCODES; j++)
            cr_assert_neq(codes[i], codes[j], "%s and %s share a value", names[i], names[j]);
    }
}

Test(errors, errno_codes_are_negated_errno) {
    cr_assert_eq(NQ_EINVAL, -EINVAL);
    cr_assert_eq(NQ_ENOMEM, -ENOMEM);
    cr_assert_eq(NQ_EAGAIN, -EAGAIN);
    cr_assert_eq(NQ_ETIMEDOUT, -ETIMEDOUT);
    cr_assert_eq(NQ_ECANCELED, -ECANCELED);
    cr_assert_eq(NQ_EALREADY, -EALREADY);
    cr_assert_eq(NQ_EBUSY, -EBUSY);
}

Test(errors, own_codes_do_not_collide_with_errno) {
    /* nq.h: the codes with no errno equivalent live in -4001..-4004. */
    cr_assert_eq(NQ_EBADH, -4001);
    cr_assert_eq(NQ_ELIMIT, -4002);
    cr_assert_eq(NQ_ECLOSED, -4003);
    cr_assert_eq(NQ_ESYS, -4004);
    const int own[] = {NQ_EBADH, NQ_ELIMIT, NQ_ECLOSED, NQ_ESYS};
    for (size_t i = 0; i < sizeof(own) / sizeof(own[0]); i++) {
        /* strerror of the matching errno would be "Unknown error N". */
        cr_assert(strstr(strerror(-own[i]), "Unknown") != NULL, "%d is an errno", -own[i]);
    }
}

Test(errors, names_and_messages_come_from_the_table) {
    for (size_t i = 0; i < NCODES; i++) {
        const char *name = nq_err_name(codes[i]), *msg = nq_strerror(codes[i]);
        cr_assert_not_null(name, "code %d", codes[i]);
        cr_assert_not_null(msg, "code %d", codes[i]);
        cr_assert_str_eq(name, names[i], "code %d is named %s", codes[i], name);
        cr_assert_str_eq(msg, msgs[i], "code %d: message \"%s\"", codes[i], msg);
        /* "NQ_E" then capitals only: NQ_EINVAL, NQ_ETIMEDOUT, ... */
        cr_assert_eq(strncmp(name, "NQ_E", 4), 0, "%s", name);
        cr_assert_gt(strlen(name), 4, "%s", name);
        for (const char *c = name + 3; *c != '\0'; c++)
            cr_assert(isupper((unsigned char)*c), "%s: '%c' in the name", name, *c);
        cr_assert_gt(strlen(msg), 0, "%s has an empty message", name);
        cr_assert_str_neq(msg, "unknown error", "%s", name);
        cr_assert_str_neq(name, "NQ_UNKNOWN");
        /* Static strings: the same pointer every time. */
        cr_assert_eq(nq_err_name(codes[i]), name);
        cr_assert_eq(nq_strerror(codes[i]), msg);
    }
    cr_assert_str_eq(nq_err_name(NQ_EINVAL), "NQ_EINVAL");
    cr_assert_str_eq(nq_err_name(NQ_EBADH), "NQ_EBADH");
    cr_assert_str_eq(nq_err_name(NQ_ESYS), "NQ_ESYS");
    cr_assert_str_eq(nq_strerror(NQ_EINVAL), "invalid argument");
    cr_assert_str_eq(nq_strerror(NQ_ETIMEDOUT), "timed out");
}

Test(errors, names_and_messages_are_distinct) {
    for (size_t i = 0; i < NCODES; i++)
        for (size_t j = i + 1; j < NCODES; j++) {
            cr_assert_str_neq(nq_err_name(codes[i]), nq_err_name(codes[j]), "%s", names[i]);
            cr_assert_str_neq(nq_strerror(codes[i]), nq_strerror(codes[j]), "%s and %s", names[i],
                              names[j]);
        }
}

Test(errors, unknown_values_get_the_fallbacks) {
    /* 0 is NQ_OK, not an error; positive errno values are not codes either. */
    const int unknown[] = {0,     1,     -1,   -2,     -99999, INT_MIN, INT_MAX,
                           -4000, -4005, 4001, EINVAL, -EPERM, -ENOENT, -EINTR};
    for (size_t i = 0; i < sizeof(unknown) / sizeof(unknown[0]); i++) {
        const char *msg = nq_strerror(unknown[i]), *name = nq_err_name(unknown[i]);
        cr_assert_not_null(msg, "%d", unknown[i]);
        cr_assert_not_null(name, "%d", unknown[i]);
        cr_assert_str_eq(msg, "unknown error", "%d", unknown[i]);
        cr_assert_str_eq(name, "NQ_UNKNOWN", "%d", unknown[i]);
    }
}

/* --- bad input: every public function, with NULL, 0, garbage and stale
 * handles. Each call gets its documented error; nothing crashes; ASan and
 * UBSan builds run this too. ------------------------------------------------ */

static void noop_wait_cb(void *data, int status, int64_t arg) {
    (void)data;
    (void)status;
    (void)arg;
}
static void noop_sub_cb(nq_sub_t *s, void *data) {
    (void)s;
    (void)data;
}

Test(errors, null_objects_are_rejected_by_every_function) {
    nq_handle_t h = 0;
    nq_wait_t *w = (nq_wait_t *)0x1;
    nq_sub_t *s = (nq_sub_t *)0x1;
    nq_stats_t st;
    nq_port_stats_t pst;
    uint64_t seq;
    int64_t arg, args[4];
    nq_waker_t none = {NULL, NULL};

    nq_config_init(NULL); /* ignored */
    cr_assert_eq(nq_queue_new(NULL, NULL), NQ_EINVAL);
    nq_queue_free(NULL);
    cr_assert_eq(nq_register(NULL, "x", &h), NQ_EINVAL);
    cr_assert_eq(nq_unregister(NULL, 1), NQ_EINVAL);
    cr_assert_eq(nq_notify(NULL, 1, 0), NQ_EINVAL);
    cr_assert_eq(nq_seq(NULL, 1, &seq), NQ_EINVAL);
    cr_assert_eq(nq_wait(NULL, 1, 0, 0, &arg), NQ_EINVAL);
    cr_assert_eq(nq_wait_start(NULL, 1, 0, none, &w), NQ_EINVAL);
    cr_assert_eq(nq_wait_result(NULL, &arg), NQ_EINVAL);
    cr_assert_eq(nq_wait_cancel(NULL), NQ_EINVAL);
    nq_wait_release(NULL);
    cr_assert_eq(nq_subscribe(NULL, 1, NULL, &s), NQ_EINVAL);
    cr_assert_eq(nq_sub_try_recv(NULL, &arg), NQ_EINVAL);
    cr_assert_eq(nq_sub_recv(NULL, 0, &arg), NQ_EINVAL);
    cr_assert_eq(nq_sub_recv_batch(NULL, args, 4), NQ_EINVAL);
    cr_assert_eq(nq_sub_dropped(NULL), 0);
    nq_sub_close(NULL);
    cr_assert_eq(nq_queue_stats(NULL, &st), NQ_EINVAL);
    cr_assert_eq(nq_queue_dump(NULL, stderr), NQ_EINVAL);
    cr_assert_eq(nq_port_new(NULL), NQ_EINVAL);
    cr_assert_eq(nq_port_new_sized(0, NULL), NQ_EINVAL);
    cr_assert_eq(nq_port_fd(NULL), NQ_EINVAL);
    cr_assert_eq(nq_port_dispatch(NULL, 0), NQ_EINVAL);
    cr_assert_eq(nq_port_timeout_ms(NULL), -1);
    nq_port_free(NULL);
    cr_assert_eq(nq_port_wait(NULL, NULL, 1, 0, -1, noop_wait_cb, NULL, &w), NQ_EINVAL);
    cr_assert_null(w, "out is cleared on failure");
    cr_assert_eq(nq_port_subscribe(NULL, NULL, 1, NULL, noop_sub_cb, NULL, &s), NQ_EINVAL);
    cr_assert_null(s, "out is cleared on failure");
    cr_assert_eq(nq_port_stats(NULL, &pst), NQ_EINVAL);
    cr_assert_eq(nq_port_attach(NULL, &h), NQ_EINVAL);
    cr_assert_eq(nq_port_detach(NULL, &h), NQ_EINVAL);
    cr_assert_eq(nq_port_on_deadline(NULL, NULL, NULL), NQ_EINVAL);
}

Test(errors, bad_arguments_on_live_objects) {
    nq_queue_t *q;
    nq_port_t *p;
    nq_handle_t h;
    cr_assert_eq(nq_queue_new(NULL, &q), 0);
    cr_assert_eq(nq_port_new(&p), 0);
    cr_assert_eq(nq_register(q, NULL, &h), 0);

    uint64_t seq;
    int64_t args[2];
    nq_sub_t *s;
    nq_wait_t *w;
    cr_assert_eq(nq_register(q, "x", NULL), NQ_EINVAL);
    cr_assert_eq(nq_seq(q, h, NULL), NQ_EINVAL);
    cr_assert_eq(nq_subscribe(q, h, NULL, NULL), NQ_EINVAL);
    cr_assert_eq(nq_wait_start(q, h, 0, (nq_waker_t){NULL, NULL}, NULL), NQ_EINVAL);
    cr_assert_eq(nq_queue_stats(q, NULL), NQ_EINVAL);
    cr_assert_eq(nq_queue_dump(q, NULL), NQ_EINVAL);
    cr_assert_eq(nq_port_stats(p, NULL), NQ_EINVAL);
    cr_assert_eq(nq_port_wait(p, q, h, 0, -1, NULL, NULL, &w), NQ_EINVAL, "no callback");
    cr_assert_eq(nq_port_wait(p, NULL, h, 0, -1, noop_wait_cb, NULL, &w), NQ_EINVAL);
    cr_assert_eq(nq_port_subscribe(p, q, h, NULL, NULL, NULL, &s), NQ_EINVAL, "no callback");
    nq_port_t *p2 = (nq_port_t *)0x1;
    cr_assert_eq(nq_port_new_sized(0, &p2), NQ_EINVAL, "no room for any item");
    cr_assert_null(p2);
    cr_assert_eq(nq_port_new_sized(UINT32_MAX, &p2), NQ_EINVAL);
    nq_sub_opts_t bad = {.capacity = UINT32_MAX};
    cr_assert_eq(nq_subscribe(q, h, &bad, &s), NQ_EINVAL, "absurd capacity");
    nq_sub_opts_t bad2 = {.overflow = (nq_overflow_t)7};
    cr_assert_eq(nq_subscribe(q, h, &bad2, &s), NQ_EINVAL, "unknown overflow policy");
    cr_assert_eq(nq_subscribe(q, h, NULL, &s), 0);
    cr_assert_eq(nq_sub_recv_batch(s, NULL, 2), NQ_EINVAL);
    cr_assert_eq(nq_sub_recv_batch(s, args, 0), NQ_EINVAL);
    cr_assert_eq(nq_sub_try_recv(s, NULL), NQ_EAGAIN, "a NULL arg pointer is allowed");
    nq_sub_close(s);
    cr_assert_eq(nq_port_attach(p, NULL), NQ_EINVAL);
    cr_assert_eq(nq_port_attach(p, &h), 0);
    cr_assert_eq(nq_port_attach(p, &seq), NQ_EBUSY, "a second adapter is refused");
    cr_assert_eq(nq_port_detach(p, &seq), NQ_EINVAL, "only the owner detaches");
    cr_assert_eq(nq_port_detach(p, &h), 0);

    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_handles = 0;
    nq_queue_t *q2 = (nq_queue_t *)0x1;
    cr_assert_eq(nq_queue_new(&cfg, &q2), NQ_EINVAL);
    cr_assert_null(q2);
    nq_port_free(p);
    nq_queue_free(q);
}

Test(errors, garbage_and_stale_handles_get_ebadh) {
    nq_queue_t *q;
    nq_port_t *p;
    cr_assert_eq(nq_queue_new(NULL, &q), 0);
    cr_assert_eq(nq_port_new(&p), 0);
    nq_handle_t stale;
    cr_assert_eq(nq_register(q, "gone", &stale), 0);
    cr_assert_eq(nq_unregister(q, stale), 0);
    const nq_handle_t bad[] = {
        0,          ~(nq_handle_t)0, 1,         (nq_handle_t)1 << 32,
        0xffffffff, stale,           stale + 1, stale ^ ((nq_handle_t)1 << 40)};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        nq_handle_t h = bad[i];
        uint64_t seq;
        int64_t arg;
        nq_wait_t *w;
        nq_sub_t *s;
        cr_assert_eq(nq_notify(q, h, 1), NQ_EBADH, "handle %#llx", (unsigned long long)h);
        cr_assert_eq(nq_unregister(q, h), NQ_EBADH);
        cr_assert_eq(nq_seq(q, h, &seq), NQ_EBADH);
        cr_assert_eq(nq_wait(q, h, 0, 0, &arg), NQ_EBADH);
        cr_assert_eq(nq_wait_start(q, h, 0, (nq_waker_t){NULL, NULL}, &w), NQ_EBADH);
        cr_assert_eq(nq_subscribe(q, h, NULL, &s), NQ_EBADH);
        cr_assert_eq(nq_port_wait(p, q, h, 0, 10, noop_wait_cb, NULL, &w), NQ_EBADH);
        cr_assert_eq(nq_port_subscribe(p, q, h, NULL, noop_sub_cb, NULL, &s), NQ_EBADH);
    }
    nq_port_stats_t pst;
    nq_port_stats(p, &pst);
    cr_assert_eq(pst.live_items, 0, "failed port calls leave nothing behind");
    nq_port_free(p);
    nq_queue_free(q);
}

Test(errors, double_close_and_use_after_unregister) {
    nq_queue_t *q;
    nq_handle_t h;
    nq_sub_t *s;
    cr_assert_eq(nq_queue_new(NULL, &q), 0);
    cr_assert_eq(nq_register(q, NULL, &h), 0);
    cr_assert_eq(nq_subscribe(q, h, NULL, &s), 0);
    cr_assert_eq(nq_unregister(q, h), 0);
    cr_assert_eq(nq_unregister(q, h), NQ_EBADH, "double unregister");
    int64_t arg;
    cr_assert_eq(nq_sub_try_recv(s, &arg), NQ_ECLOSED, "a closed subscription says so");
    cr_assert_eq(nq_sub_recv(s, 1000000, &arg), NQ_ECLOSED);
    nq_sub_close(s);
    nq_queue_free(q);
}
