/* FastCDC (Xia et al., USENIX ATC'16) with a gear rolling hash and normalized chunking, plus forced
 * cuts and a parallel driver whose output is identical to the serial one.
 *
 * Gear hash: h = (h << 1) + GEAR[byte]. Bit k of h depends on the last k+1 bytes only, so the top bits
 * see a 64-byte window; the cut masks therefore select the top bits of h.
 * Normalized chunking: from min_size to avg_size a cut needs log2(avg)+2 zero bits (rarer than 1/avg),
 * after avg_size only log2(avg)-2 (more likely): chunk sizes bunch up around avg_size. The first
 * min_size bytes of a chunk are not hashed at all (they cannot hold a cut). */
#define _GNU_SOURCE
#include "chunker.h"
#include "blake3.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- the cut function -------------------------------------------------------------------- */

static uint64_t GEAR[256];

/* The gear table is splitmix64 (Steele et al.) from a fixed seed: 256 well-mixed 64-bit values that
 * anyone can regenerate. Changing it changes every chunk boundary, so it is part of the format. */
void cdc_init(void)
{
    uint64_t x = 0x636c6f7764657221ULL; /* "clowder!" */
    for (int i = 0; i < 256; i++) {
        uint64_t z = (x += 0x9E3779B97F4A7C15ULL);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        GEAR[i] = z ^ (z >> 31);
    }
}

typedef struct {
    size_t min, avg, max;
    uint64_t mask_s, mask_l; /* stricter below avg, looser above */
} cdc_cfg;

static cdc_cfg make_cfg(const cdc_params *p)
{
    int bits = __builtin_ctzll(p->avg_size);
    cdc_cfg c = {p->min_size, p->avg_size, p->max_size, ~0ULL << (64 - (bits + 2)), ~0ULL << (64 - (bits - 2))};
    return c;
}

/* Length of the chunk that starts at p, in a segment with n bytes left.
 *
 * Two bytes a step (FastCDC 2020's "rolling two bytes", kept exact): with g0, g1 the gear values of the
 * next two bytes, h after one byte is 2h + g0 and after two 4h + (2 g0 + g1). The bracket does not
 * depend on h, so the chain from one h to the next is one shift-and-add per two bytes instead of two,
 * and both positions are still tested: the cut points are those of the byte-at-a-time definition. A
 * step that finds a cut breaks out to the byte loop, which redoes it from the h before it. */
static size_t cut(const uint8_t *p, size_t n, const cdc_cfg *c)
{
    if (n <= c->min)
        return n;
    size_t end = n < c->max ? n : c->max;
    size_t i = c->min, stop = c->avg < end ? c->avg : end;
    uint64_t h = 0, mask = c->mask_s;
    for (;;) {
        const uint8_t *q = p + i, *pairs_end = p + i + ((stop - i) & ~(size_t)1);
#pragma GCC unroll 4
        for (; q < pairs_end; q += 2) {
            uint64_t g0 = GEAR[q[0]], g01 = (g0 << 1) + GEAR[q[1]];
            /* Keeps the compiler from folding g01 back into the chain as (4h + g1) + 2 g0. */
            __asm__("" : "+r"(g01));
            uint64_t h1 = (h << 1) + g0, h2 = (h << 2) + g01;
            if (__builtin_expect(!(h1 & mask), 0) || __builtin_expect(!(h2 & mask), 0))
                break;
            h = h2;
        }
        for (i = (size_t)(q - p); i < stop; i++) {
            h = (h << 1) + GEAR[p[i]];
            if (!(h & mask))
                return i + 1;
        }
        if (stop == end)
            return end;
        stop = end; /* past avg_size: the looser mask */
        mask = c->mask_l;
    }
}

const char *cdc_check_params(const cdc_params *p)
{
    size_t a = p->avg_size;
    if (a < 256 || a > ((size_t)1 << 30) || (a & (a - 1)))
        return "avg_size must be a power of two between 256 and 2**30";
    if (p->min_size < 64)
        return "min_size must be at least 64";
    if (!(p->min_size <= a && a <= p->max_size))
        return "sizes must satisfy min_size <= avg_size <= max_size";
    if (p->max_size > ((size_t)1 << 31))
        return "max_size must be at most 2**31";
    return NULL;
}

const char *cdc_check_cuts(const uint64_t *cuts, size_t ncuts, uint64_t len)
{
    for (size_t i = 0; i < ncuts; i++) {
        if (cuts[i] == 0 || cuts[i] >= len)
            return "cut out of range: every cut must satisfy 0 < cut < len(data)";
        if (i && cuts[i] <= cuts[i - 1])
            return "cuts must be strictly increasing";
    }
    return NULL;
}

/* ---- chunk lists ------------------------------------------------------------------------- */

static int push(cdc_chunks *v, const uint8_t *data, uint64_t off, uint64_t len)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? 2 * v->cap : 64;
        cdc_chunk *nv = realloc(v->v, cap * sizeof *nv);
        if (!nv)
            return ENOMEM;
        v->v = nv;
        v->cap = cap;
    }
    cdc_chunk *c = &v->v[v->n++];
    c->off = off;
    c->len = len;
    blake3(data + off, len, c->id); /* right after cut() read it: the bytes are in cache */
    return 0;
}

static int append(cdc_chunks *v, const cdc_chunk *src, size_t n)
{
    if (v->n + n > v->cap) {
        size_t cap = v->cap ? v->cap : 64;
        while (cap < v->n + n)
            cap *= 2;
        cdc_chunk *nv = realloc(v->v, cap * sizeof *nv);
        if (!nv)
            return ENOMEM;
        v->v = nv;
        v->cap = cap;
    }
    memcpy(v->v + v->n, src, n * sizeof *src);
    v->n += n;
    return 0;
}

/* ---- copying to dst (ingest) --------------------------------------------------------------- */

enum { WRITE_WINDOW = 2 << 20 }; /* bytes written per pwrite: recently cut and hashed, so in cache */

int cdc_write_all(int fd, const uint8_t *buf, uint64_t len, uint64_t off)
{
    while (len) {
        size_t want = len > (1u << 30) ? (1u << 30) : (size_t)len;
        ssize_t w = pwrite(fd, buf, want, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)
            return EIO;
        buf += w;
        len -= (uint64_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

static int write_range(int fd, const uint8_t *data, uint64_t off, uint64_t len)
{
    int e = cdc_write_all(fd, data + off, len, off);
    if (e)
        return e;
    /* Start writeback now so it overlaps the rest of the work instead of piling up for fsync. Files
     * that cannot do this (pipes, some devices) just skip it. */
    if (sync_file_range(fd, (off_t)off, (off_t)len, SYNC_FILE_RANGE_WRITE) < 0 && errno != ESPIPE &&
        errno != EINVAL)
        return errno;
    return 0;
}

/* ---- parallel driver ----------------------------------------------------------------------
 * The input is divided into segments by the forced cuts, and into `threads` equal slices. A slice
 * edge inside a segment splits it into parts; each part is chunked as if a segment started there,
 * until its last chunk reaches the part's end (that chunk may run on into the next part). Each thread
 * chunks the parts starting in its slice. The merge then walks the parts in order: where the chunks
 * carried over from the previous part end on a boundary the next part also found, the two agree
 * from there on (a boundary depends only on the bytes after the previous one) and the next part's
 * chunks are taken; otherwise chunking continues serially from the carried-over boundary until it
 * meets one. So the result equals serial chunking for any thread count. */

typedef struct {
    uint64_t start, end, seg_end;
    int owner;
    cdc_chunks chunks;
} part;

typedef struct {
    const uint8_t *data;
    const cdc_cfg *cfg;
    part *parts;
    size_t nparts;
    int dst_fd;
    int thread;
    int error; /* first errno seen by any thread; others stop early */
    int *shared_error;
} worker;

static int chunk_part(const uint8_t *data, const cdc_cfg *cfg, part *pt, int dst_fd, const int *stop)
{
    uint64_t pos = pt->start, written = pt->start;
    while (pos < pt->end) {
        if (__atomic_load_n(stop, __ATOMIC_RELAXED))
            return 0;
        size_t n = cut(data + pos, pt->seg_end - pos, cfg);
        int e = push(&pt->chunks, data, pos, n);
        if (e)
            return e;
        pos += n;
        /* This part writes exactly its own bytes [start, end); the next part writes the rest. */
        uint64_t upto = pos < pt->end ? pos : pt->end;
        if (dst_fd >= 0 && (upto - written >= WRITE_WINDOW || upto == pt->end)) {
            if ((e = write_range(dst_fd, data, written, upto - written)))
                return e;
            written = upto;
        }
    }
    return 0;
}

static void *work(void *arg)
{
    worker *w = arg;
    for (size_t i = 0; i < w->nparts; i++) {
        if (w->parts[i].owner != w->thread)
            continue;
        int e = chunk_part(w->data, w->cfg, &w->parts[i], w->dst_fd, w->shared_error);
        if (e) {
            int zero = 0;
            __atomic_compare_exchange_n(w->shared_error, &zero, e, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
            break;
        }
    }
    return NULL;
}

/* Index of the chunk in v starting at off, or -1. */
static ptrdiff_t find_start(const cdc_chunks *v, uint64_t off)
{
    size_t lo = 0, hi = v->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v->v[mid].off < off)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < v->n && v->v[lo].off == off ? (ptrdiff_t)lo : -1;
}

/* Appends the true chunks of parts [0, nparts) to out, in order. */
static int merge(const uint8_t *data, const cdc_cfg *cfg, part *parts, size_t nparts, cdc_chunks *out)
{
    uint64_t pos = 0; /* next boundary of the serial chunking */
    for (size_t i = 0; i < nparts; i++) {
        part *pt = &parts[i];
        const cdc_chunks *v = &pt->chunks;
        uint64_t reach = v->n ? v->v[v->n - 1].off + v->v[v->n - 1].len : pt->start;
        int e;
        while (pos < reach) {
            ptrdiff_t k = find_start(v, pos);
            if (k >= 0) { /* in sync: the rest of this part is right */
                if ((e = append(out, v->v + k, v->n - (size_t)k)))
                    return e;
                pos = reach;
                break;
            }
            size_t n = cut(data + pos, pt->seg_end - pos, cfg);
            if ((e = push(out, data, pos, n)))
                return e;
            pos += n;
        }
    }
    return 0;
}

int cdc_run(const uint8_t *data, uint64_t len, const uint64_t *cuts, size_t ncuts, const cdc_params *p,
            int threads, int dst_fd, cdc_chunks *out)
{
    cdc_cfg cfg = make_cfg(p);
    memset(out, 0, sizeof *out);
    if (len == 0)
        return 0;
    /* Slices smaller than a few chunks only add merge work. */
    uint64_t most = len / (4 * (uint64_t)p->max_size);
    if (threads < 1)
        threads = 1;
    if ((uint64_t)threads > most)
        threads = most ? (int)most : 1;

    /* Parts: segments split at slice edges. At most ncuts + threads of them. */
    size_t cap = ncuts + 1 + (size_t)threads, nparts = 0;
    part *parts = calloc(cap, sizeof *parts);
    if (!parts)
        return ENOMEM;
    int slice = 0;
    for (size_t s = 0; s <= ncuts; s++) {
        uint64_t a = s ? cuts[s - 1] : 0, b = s < ncuts ? cuts[s] : len;
        while (a < b) {
            while (slice + 1 < threads && (uint64_t)(slice + 1) * (len / threads) <= a)
                slice++;
            uint64_t edge = slice + 1 < threads ? (uint64_t)(slice + 1) * (len / threads) : len;
            uint64_t e = edge < b ? edge : b;
            parts[nparts++] = (part){a, e, b, slice, {0}};
            a = e;
        }
    }

    int error = 0;
    worker *ws = calloc((size_t)threads, sizeof *ws);
    pthread_t *tids = calloc((size_t)threads, sizeof *tids);
    if (!ws || !tids) {
        error = ENOMEM;
        goto done;
    }
    for (int t = 0; t < threads; t++)
        ws[t] = (worker){data, &cfg, parts, nparts, dst_fd, t, 0, &error};
    int started = 1; /* thread 0 is this one */
    for (; started < threads; started++)
        if (pthread_create(&tids[started], NULL, work, &ws[started]))
            break; /* fewer threads: the parts left over are done below */
    work(&ws[0]);
    for (int t = 1; t < started; t++)
        pthread_join(tids[t], NULL);
    for (int t = started; t < threads && !error; t++)
        work(&ws[t]);
    if (!error)
        error = merge(data, &cfg, parts, nparts, out);

done:
    for (size_t i = 0; i < nparts; i++)
        free(parts[i].chunks.v);
    free(parts);
    free(ws);
    free(tids);
    if (error) {
        free(out->v);
        memset(out, 0, sizeof *out);
    }
    return error;
}
