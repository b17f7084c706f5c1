/* BLAKE3, hash mode only, written from the specification (Aumasson, Neves, O'Connor, Wilcox-O'Hearn).
 *
 * Layout follows the spec: a compression function over 64-byte blocks, chunks of 16 blocks chained
 * through their chaining value (CV), and a binary tree of parent nodes whose left subtree always holds
 * the largest power of two of chunks. The speed comes from hashing many independent inputs (whole
 * chunks, or parents of one tree level) side by side, one per SIMD lane: the kernels of blake3_x86.c,
 * picked at run time, with the portable one-at-a-time kernel below as the fallback.
 *
 * Words are read and written in host order: only little-endian hosts are supported. */
#include "blake3.h"
#include "blake3_impl.h"

#include <string.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "native/blake3.c assumes a little-endian host"
#endif

/* Whole input is cut into groups of GROUP_CHUNKS chunks: each group's subtree is reduced level by
 * level with SIMD parents, and groups are joined with a small CV stack. 128 chunks = 128 KiB, the
 * largest CDC chunk, so a chunk id is always one group. */
enum { GROUP_CHUNKS = 128, GROUP_LEN = GROUP_CHUNKS * CHUNK_LEN };

/* ---- portable compression ---------------------------------------------------------------- */

#define ROTR32(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void compress_portable(const uint32_t cv[8], const uint8_t block[BLOCK_LEN], uint32_t block_len,
                              uint64_t counter, uint32_t flags, uint32_t out[8])
{
    uint32_t m[16], v[16];
    memcpy(m, block, BLOCK_LEN);
    memcpy(v, cv, 32);
    memcpy(v + 8, BLAKE3_IV, 16);
    v[12] = (uint32_t)counter;
    v[13] = (uint32_t)(counter >> 32);
    v[14] = block_len;
    v[15] = flags;
    for (int r = 0; r < 7; r++)
        B3_ROUND(v, m, r, ROTR32);
    for (int i = 0; i < 8; i++)
        out[i] = v[i] ^ v[i + 8];
}

static const b3_kernel PORTABLE = {"portable", compress_portable, {{NULL, 0}, {NULL, 0}}};

/* ---- kernels ----------------------------------------------------------------------------- */

/* What this CPU runs, fastest first, portable last; `kernel` is the one in use. */
static const b3_kernel *kernels[4] = {&PORTABLE};
static size_t nkernels = 1;
static const b3_kernel *kernel = &PORTABLE;

void blake3_init(void)
{
    nkernels = blake3_simd_kernels(kernels);
    kernels[nkernels++] = &PORTABLE;
    __atomic_store_n(&kernel, kernels[0], __ATOMIC_RELAXED);
}

const char *blake3_kernel(void) { return __atomic_load_n(&kernel, __ATOMIC_RELAXED)->name; }

size_t blake3_kernels(const char *names[4])
{
    for (size_t i = 0; i < nkernels; i++)
        names[i] = kernels[i]->name;
    return nkernels;
}

int blake3_use_kernel(const char *name)
{
    for (size_t i = 0; i < nkernels; i++)
        if (!strcmp(kernels[i]->name, name)) {
            __atomic_store_n(&kernel, kernels[i], __ATOMIC_RELAXED);
            return 0;
        }
    return -1;
}

/* CV of one chunk of len (0..1024) bytes; last_flags is ROOT when the chunk is the whole input. */
static void chunk_cv(const b3_kernel *k, const uint8_t *in, size_t len, uint64_t counter,
                     uint32_t last_flags, uint32_t out[8])
{
    size_t nblocks = len ? (len + BLOCK_LEN - 1) / BLOCK_LEN : 1;
    memcpy(out, BLAKE3_IV, 32);
    for (size_t b = 0; b < nblocks; b++) {
        size_t blen = b + 1 < nblocks ? BLOCK_LEN : len - b * BLOCK_LEN;
        uint8_t pad[BLOCK_LEN];
        const uint8_t *block = in + b * BLOCK_LEN;
        if (blen < BLOCK_LEN) { /* the spec zero-pads a short last block */
            memset(pad, 0, sizeof pad);
            memcpy(pad, block, blen);
            block = pad;
        }
        uint32_t flags = (b == 0 ? CHUNK_START : 0) | (b + 1 == nblocks ? CHUNK_END | last_flags : 0);
        k->compress(out, block, (uint32_t)blen, counter, flags, out);
    }
}

static void parent_cv(const b3_kernel *k, const uint32_t left[8], const uint32_t right[8], uint32_t flags,
                      uint32_t out[8])
{
    uint32_t block[16];
    memcpy(block, left, 32);
    memcpy(block + 8, right, 32);
    k->compress(BLAKE3_IV, (const uint8_t *)block, BLOCK_LEN, 0, PARENT | flags, out);
}

/* ---- many inputs at once ------------------------------------------------------------------ */

/* hash_many_fn (blake3_impl.h) for any n: batches as wide as the kernel's widest SIMD width, each on the
 * narrowest width that holds it; a lone input one block at a time. */
static void hash_many(const b3_kernel *k, const uint8_t *in, size_t stride, size_t n, size_t blocks,
                      uint64_t counter, int inc, uint32_t flags, uint32_t start_flags, uint32_t end_flags,
                      uint32_t *out)
{
    while (n) {
        size_t take = n < k->simd[0].lanes ? n : k->simd[0].lanes;
        if (take <= 1) {
            take = 1;
            uint32_t cv[8]; /* not in out yet: a parent's output overwrites its own input */
            memcpy(cv, BLAKE3_IV, 32);
            for (size_t b = 0; b < blocks; b++) {
                uint32_t f = flags | (b == 0 ? start_flags : 0) | (b + 1 == blocks ? end_flags : 0);
                k->compress(cv, in + b * BLOCK_LEN, BLOCK_LEN, counter, f, cv);
            }
            memcpy(out, cv, 32);
        } else {
            hash_many_fn *fn = k->simd[1].fn && take <= k->simd[1].lanes ? k->simd[1].fn : k->simd[0].fn;
            fn(in, stride, take, blocks, counter, inc, flags, start_flags, end_flags, out);
        }
        in += take * stride;
        counter += inc ? take : 0;
        out += 8 * take;
        n -= take;
    }
}

/* ---- tree --------------------------------------------------------------------------------- */

/* CV of the subtree over len (1..GROUP_LEN) bytes whose first chunk has number counter; with root set
 * it is the whole input and out is its hash. Levels are reduced pairwise left to right, an odd last
 * node moving up unchanged: that gives exactly the spec's left-heavy tree. */
static void subtree_cv(const b3_kernel *k, const uint8_t *in, size_t len, uint64_t counter, int root, uint32_t out[8])
{
    uint32_t cvs[GROUP_CHUNKS * 8];
    size_t n = (len + CHUNK_LEN - 1) / CHUNK_LEN, full = len / CHUNK_LEN;
    if (n == 1) {
        chunk_cv(k, in, len, counter, root ? ROOT : 0, out);
        return;
    }
    hash_many(k, in, CHUNK_LEN, full, CHUNK_LEN / BLOCK_LEN, counter, 1, 0, CHUNK_START, CHUNK_END, cvs);
    if (full < n)
        chunk_cv(k, in + full * CHUNK_LEN, len - full * CHUNK_LEN, counter + full, 0, cvs + 8 * full);
    while (n > 2) {
        size_t pairs = n / 2;
        /* In place: batch k writes where batch k/2 read, and each batch reads before writing. */
        hash_many(k, (const uint8_t *)cvs, BLOCK_LEN, pairs, 1, 0, 0, PARENT, 0, 0, cvs);
        if (n & 1)
            memcpy(cvs + 8 * pairs, cvs + 8 * (n - 1), 32);
        n = pairs + (n & 1);
    }
    parent_cv(k, cvs, cvs + 8, root ? ROOT : 0, out);
}

void blake3(const uint8_t *in, size_t len, uint8_t out[BLAKE3_OUT_LEN])
{
    const b3_kernel *k = __atomic_load_n(&kernel, __ATOMIC_RELAXED);
    uint32_t stack[64][8], cv[8];
    size_t depth = 0;
    /* Every group but the one holding the last byte is complete and has input after it, so it can be
     * merged into the stack eagerly (the spec's "merge when more input follows"). */
    uint64_t groups = len ? (len - 1) / GROUP_LEN : 0;
    for (uint64_t g = 0; g < groups; g++) {
        subtree_cv(k, in + g * GROUP_LEN, GROUP_LEN, g * GROUP_CHUNKS, 0, cv);
        for (uint64_t total = g + 1; !(total & 1); total >>= 1)
            parent_cv(k, stack[--depth], cv, 0, cv);
        memcpy(stack[depth++], cv, 32);
    }
    if (len == 0)
        chunk_cv(k, in, 0, 0, ROOT, cv);
    else
        subtree_cv(k, in + groups * GROUP_LEN, len - groups * GROUP_LEN, groups * GROUP_CHUNKS, groups == 0,
                   cv);
    while (depth) {
        depth--;
        parent_cv(k, stack[depth], cv, depth == 0 ? ROOT : 0, cv);
    }
    memcpy(out, cv, BLAKE3_OUT_LEN);
}
