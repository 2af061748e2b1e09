/* The handle table (handle.h): the queue object, its memory accounting, the
 * chunked slots, registration, and nq_seq. Notify, unregister, stats and the
 * queue's free are in queue.c, above waits and subscriptions.
 */
#include <string.h>

#include "core/handle.h"
#include "core/testhooks.h"

#define NQ__DEF_HANDLES 65536u
#define NQ__DEF_WAITERS 256u
#define NQ__DEF_SUBS 64u
#define NQ__DEF_CAPACITY 1024u
#define NQ__DEF_MAX_CAPACITY (1u << 20)
#define NQ__DEF_MEMORY ((size_t)256 << 20)

/* Bytes a subscription and a wait may hold at most, for the derived memory
 * limit (sub.c and wait.c charge what they allocate; these bound it). */
#define NQ__SUB_BYTES_MAX 256u
#define NQ__WAIT_BYTES_MAX 256u

void nq_config_init(nq_config_t *cfg) {
    if (cfg == NULL)
        return;
    memset(cfg, 0, sizeof(*cfg));
    cfg->max_handles = NQ__DEF_HANDLES;
    cfg->max_waiters_per_handle = NQ__DEF_WAITERS;
    cfg->max_subscribers_per_handle = NQ__DEF_SUBS;
    cfg->default_capacity = NQ__DEF_CAPACITY;
    cfg->memory_limit = NQ__DEF_MEMORY;
    cfg->max_capacity = NQ__DEF_MAX_CAPACITY;
}

nq__slot_t nq__dead_chunk[NQ__CHUNK_SLOTS] = {
    [0 ... NQ__CHUNK_SLOTS - 1] = {.hot = {.word = NQ__W_DEAD}}};

static uint32_t nq__nchunks(uint32_t max_handles) {
    return (max_handles + NQ__CHUNK_SLOTS - 1) >> NQ__CHUNK_SHIFT;
}

/* Slots in chunk c: NQ__CHUNK_SLOTS, or what is left of max_handles. */
static inline uint32_t nq__chunk_slots(const nq_queue_t *q, uint32_t c) {
    uint32_t n = q->cfg.max_handles - (c << NQ__CHUNK_SHIFT);
    return n > NQ__CHUNK_SLOTS ? NQ__CHUNK_SLOTS : n;
}

/* Bytes of chunk c as allocated (and charged): its slots' hot and cold
 * parts, rounded up to a cache line by nq__aligned_alloc. */
static size_t nq__chunk_bytes_for(uint32_t nslots) {
    size_t b = (size_t)nslots * sizeof(nq__slot_t);
    return (b + NQ__CACHELINE - 1) & ~(size_t)(NQ__CACHELINE - 1);
}

/* 0 = derived: what the limits can use at most, saturated. */
static size_t nq__derived_memory(const nq_config_t *c) {
    double per_handle = (double)sizeof(nq__slot_t) + NQ__HINT_MAX +
                        (double)c->max_waiters_per_handle * NQ__WAIT_BYTES_MAX +
                        (double)c->max_subscribers_per_handle *
                            (NQ__SUB_BYTES_MAX + NQ__HINT_MAX + sizeof(void *) +
                             (double)c->default_capacity * sizeof(int64_t));
    double total = (double)sizeof(nq_queue_t) + (double)c->max_handles * per_handle +
                   (double)nq__nchunks(c->max_handles) * (sizeof(void *) + NQ__CACHELINE);
    return total >= (double)SIZE_MAX ? SIZE_MAX : (size_t)total;
}

/* Queue tags (11 bits, handle.h): consecutive queues get consecutive tags,
 * so two queues of one process tell their handles apart unless 2047 queues
 * were made between them; the start is mixed from the clock so two
 * processes differ too. */
static _Atomic uint32_t nq__next_tag;

static uint32_t nq__new_tag(void) {
    /* Relaxed: a counter, ordering nothing. */
    uint32_t t = atomic_fetch_add_explicit(&nq__next_tag, 1, memory_order_relaxed);
    if (t == 0) { /* first queue of the process: pick a start */
        uint32_t seed = (uint32_t)nq__now_ns() * 2654435761u;
        uint32_t expect = 1;
        atomic_compare_exchange_strong_explicit(&nq__next_tag, &expect, seed + 1,
                                                memory_order_relaxed, memory_order_relaxed);
        t = seed;
    }
    t &= 0x7ff;
    return t == 0 ? 1 : t; /* tag 0 never: a forged handle with zeros fails */
}

int nq_queue_new(const nq_config_t *cfg, nq_queue_t **out) {
    nq_config_t c;
    if (out == NULL)
        return NQ_EINVAL;
    *out = NULL;
    if (cfg == NULL)
        nq_config_init(&c);
    else
        c = *cfg;
    if (c.max_capacity == 0) /* a caller that zeroed the struct by hand */
        c.max_capacity = NQ__DEF_MAX_CAPACITY;
    if (c.max_handles == 0 || c.max_handles > NQ__MAX_HANDLES ||
        c.max_waiters_per_handle == 0 || c.max_waiters_per_handle > NQ__MAX_WAITERS ||
        c.max_subscribers_per_handle == 0 || c.max_subscribers_per_handle > NQ__MAX_SUBS ||
        c.max_capacity > NQ__MAX_CAPACITY || c.default_capacity == 0 ||
        c.default_capacity > c.max_capacity)
        return NQ_EINVAL;
    if (c.memory_limit == 0)
        c.memory_limit = nq__derived_memory(&c);

    size_t table_sz = (size_t)nq__nchunks(c.max_handles) * sizeof(*((nq_queue_t *)0)->chunks);
    if (sizeof(nq_queue_t) + table_sz > c.memory_limit)
        return NQ_ENOMEM;
    nq_queue_t *q = nq__aligned_alloc(NQ__CACHELINE, sizeof(*q));
    if (q == NULL)
        return NQ_ENOMEM;
    memset(q, 0, sizeof(*q));
    q->chunks = nq__calloc(nq__nchunks(c.max_handles), sizeof(*q->chunks));
    if (q->chunks == NULL) {
        nq__free(q);
        return NQ_ENOMEM;
    }
    if (pthread_mutex_init(&q->lock, NULL) != 0) {
        nq__free(q->chunks);
        nq__free(q);
        return NQ_ESYS;
    }
    for (uint32_t i = 0; i < nq__nchunks(c.max_handles); i++)
        atomic_init(&q->chunks[i], nq__dead_chunk);
    q->cfg = c;
    uint32_t tag = nq__new_tag();
    q->lo_base = ((tag & 0x7f) << 25) + 1;
    q->wtag = ((tag >> 7) << NQ__W_TAG_SHIFT) | (uint32_t)NQ__W_LIVE;
    q->gen_mask = NQ__GEN_MAX;
    atomic_init(&q->bytes, sizeof(*q) + table_sz);
    atomic_init(&q->refs, 1);
    *out = q;
    return 0;
}

/* --- memory accounting -------------------------------------------------- */

int nq__mem_reserve(nq_queue_t *q, size_t n) {
    /* Relaxed: the counter only bounds memory, it orders nothing. */
    size_t old = atomic_fetch_add_explicit(&q->bytes, n, memory_order_relaxed);
    if (old + n > q->cfg.memory_limit || old + n < old) {
        atomic_fetch_sub_explicit(&q->bytes, n, memory_order_relaxed);
        return NQ_ENOMEM;
    }
    return 0;
}

void nq__mem_release(nq_queue_t *q, size_t n) {
    atomic_fetch_sub_explicit(&q->bytes, n, memory_order_relaxed);
}

char *nq__hint_dup(nq_queue_t *q, const char *hint, size_t *charged) {
    *charged = 0;
    if (hint == NULL || hint[0] == '\0')
        return NULL;
    size_t n = strnlen(hint, NQ__HINT_MAX - 1);
    if (nq__mem_reserve(q, n + 1) < 0)
        return NULL;
    char *s = nq__malloc(n + 1);
    if (s == NULL) {
        nq__mem_release(q, n + 1);
        return NULL;
    }
    memcpy(s, hint, n);
    s[n] = '\0';
    *charged = n + 1;
    return s;
}

void nq__hint_free(nq_queue_t *q, char *hint) {
    if (hint == NULL)
        return;
    nq__mem_release(q, strlen(hint) + 1);
    nq__free(hint);
}

/* --- slots -------------------------------------------------------------- */

/* Under q->lock: allocates, charges and publishes chunk c. Its slots are
 * free (not live, generation 0) until nq_register hands them out in order. */
static int nq__chunk_new(nq_queue_t *q, uint32_t c) {
    size_t bytes = nq__chunk_bytes_for(nq__chunk_slots(q, c));
    if (nq__mem_reserve(q, bytes) < 0)
        return NQ_ENOMEM;
    nq__slot_t *slots = nq__aligned_alloc(NQ__CACHELINE, bytes);
    if (slots == NULL) {
        nq__mem_release(q, bytes);
        return NQ_ENOMEM;
    }
    memset(slots, 0, bytes);
    for (size_t i = 0; i < nq__chunk_slots(q, c); i++) {
        atomic_init(&slots[i].hot.word, NQ__W_DEAD);
        atomic_init(&slots[i].hot.arg0, 0);
        atomic_init(&slots[i].hot.arg1, 0);
    }
    /* Release pairs with the acquire in nq__slot_at. */
    atomic_store_explicit(&q->chunks[c], slots, memory_order_release);
    return 0;
}

int nq__queue_set_gen_bits(nq_queue_t *q, unsigned bits) {
    if (q == NULL || bits == 0 || bits > 24)
        return NQ_EINVAL;
    q->gen_mask = bits == 24 ? NQ__GEN_MAX : (1u << bits) - 1;
    return 0;
}

int nq_register(nq_queue_t *q, const char *debug_hint, nq_handle_t *out) {
    if (q == NULL || out == NULL)
        return NQ_EINVAL;
    *out = 0;
    if (atomic_load_explicit(&q->closing, memory_order_relaxed))
        return NQ_ECLOSED;

    size_t charged;
    char *hint = nq__hint_dup(q, debug_hint, &charged);
    if (debug_hint != NULL && debug_hint[0] != '\0' && hint == NULL)
        return NQ_ENOMEM;

    pthread_mutex_lock(&q->lock);
    nq__hslot_t *s = NULL;
    uint32_t idx = 0;
    int rc = 0;
    if (q->live >= q->cfg.max_handles) {
        rc = NQ_ELIMIT;
    } else if (q->free_head != 0) { /* FIFO: the slot freed longest ago */
        idx = q->free_head - 1;
        s = nq__slot_at(q, idx);
        q->free_head = nq__slot_cold(q, idx)->next_free;
        if (q->free_head == 0)
            q->free_tail = 0;
    } else if (q->used < q->cfg.max_handles) {
        /* The first slot of a chunk: the chunk is allocated now. */
        if ((q->used & (NQ__CHUNK_SLOTS - 1)) == 0)
            rc = nq__chunk_new(q, q->used >> NQ__CHUNK_SHIFT);
        if (rc == 0) {
            idx = q->used++;
            s = nq__slot_at(q, idx);
        }
    } else {
        rc = NQ_ELIMIT; /* every slot is live or retired */
    }
    if (rc < 0) {
        pthread_mutex_unlock(&q->lock);
        nq__hint_free(q, hint);
        return rc;
    }
    uint64_t w = nq__hold_any(s); /* stale notifiers may still look at it */
    uint32_t gen = (nq__id_gen((uint32_t)w) + 1) & q->gen_mask;
    if (gen == 0) /* never 0 here: see nq__slot_free_locked */
        gen = 1;
    atomic_store_explicit(&s->seq_hi, 0, memory_order_relaxed);
    uint32_t id = (gen << NQ__W_GEN_SHIFT) | q->wtag;
    atomic_store_explicit(nq__arg_cell(s, id), 0, memory_order_relaxed); /* H5 */
    nq__slot_cold(q, idx)->hint = hint;
    *out = nq__handle_of(q, idx, id);
    nq__release(s, id); /* seq 0, no receivers */
    q->live++;
    pthread_mutex_unlock(&q->lock);
    return 0;
}

void nq__slot_free_locked(nq_queue_t *q, uint32_t index, uint32_t gen) {
    /* A slot whose next generation would wrap is retired for good, so no
     * handle value is ever issued twice for it. */
    if (((gen + 1) & q->gen_mask) == 0 || gen == q->gen_mask) {
        nq__slot_cold(q, index)->retired = 1;
        q->retired++;
        return;
    }
    nq__slot_cold(q, index)->next_free = 0;
    if (q->free_tail != 0)
        nq__slot_cold(q, q->free_tail - 1)->next_free = index + 1;
    else
        q->free_head = index + 1;
    q->free_tail = index + 1;
}

int nq_seq(nq_queue_t *q, nq_handle_t h, uint64_t *seq) {
    if (q == NULL || seq == NULL)
        return NQ_EINVAL;
    uint32_t index;
    nq__hslot_t *s = nq__slot_of(q, h, &index);
    if (s == NULL)
        return NQ_EBADH;
    uint32_t id = nq__h_id(h);
    /* Without HELD, so a reader is never held up by producers in flow:
     * seq_hi changes only with a carry of the word's low half, made by a
     * holder while the word in memory reads 2^32 - 1 (its store of seq_hi
     * is release, before the release that publishes the carried word). Two
     * loads of the word with the same low half, not 2^32 - 1, around an
     * acquire load of seq_hi: no carry was under way or made between them,
     * and seq_hi goes with that low half (a seq_hi newer than it would have
     * made the second load see the held 2^32 - 1 or later). Else: HELD. */
    for (int tries = 0; tries < 4; tries++) {
        uint64_t w = atomic_load_explicit(&s->word, memory_order_acquire);
        if (nq__w_id(w) != id)
            return NQ_EBADH;
        uint32_t lo = (uint32_t)(w >> 32);
        if (lo == UINT32_MAX)
            break;
        uint64_t hi = atomic_load_explicit(&s->seq_hi, memory_order_acquire);
        uint64_t w2 = atomic_load_explicit(&s->word, memory_order_acquire);
        if ((uint32_t)(w2 >> 32) == lo) {
            *seq = (hi << 32) | lo;
            return 0;
        }
    }
    uint64_t w = nq__hold(s, id);
    if (w == 0)
        return NQ_EBADH;
    *seq = nq__held_seq(s, w);
    nq__release(s, w);
    return 0;
}

/* --- lifetime ----------------------------------------------------------- */

static void nq__queue_destroy(nq_queue_t *q) {
    for (uint32_t i = 0; i < q->used; i++)
        if (nq__slot_cold(q, i)->subs_cap >= 2)
            nq__free(nq__slot_cold(q, i)->subs);
    /* Relaxed: the last unref (acq_rel) ordered every publication before us. */
    for (uint32_t c = 0; c < nq__nchunks(q->cfg.max_handles); c++) {
        nq__slot_t *chunk = atomic_load_explicit(&q->chunks[c], memory_order_relaxed);
        if (chunk != nq__dead_chunk)
            nq__free(chunk);
    }
    pthread_mutex_destroy(&q->lock);
    nq__free(q->chunks);
    nq__free(q);
}

/* Drops one reference; the last frees the queue. Acq_rel: every access a
 * releasing wait or subscription made happens-before the free. */
void nq__queue_unref(nq_queue_t *q) {
    if (atomic_fetch_sub_explicit(&q->refs, 1, memory_order_acq_rel) == 1)
        nq__queue_destroy(q);
}

int nq__handle_set_seq(nq_queue_t *q, nq_handle_t h, uint64_t seq) {
    if (q == NULL)
        return NQ_EINVAL;
    uint32_t index;
    nq__hslot_t *s = nq__slot_of(q, h, &index);
    if (s == NULL)
        return NQ_EBADH;
    uint64_t w = nq__hold(s, nq__h_id(h));
    if (w == 0)
        return NQ_EBADH;
    atomic_store_explicit(&s->seq_hi, (uint32_t)(seq >> 32), memory_order_relaxed);
    nq__release(s, (w & 0xffffffffull) | (seq << 32));
    return 0;
}
