/* BLAKE3, hash mode only, written from the specification (Aumasson, Neves, O'Connor, Wilcox-O'Hearn).
 *
 * Layout follows the spec: a compression function over 64-byte blocks, chunks of 16 blocks chained
 * through their chaining value (CV), and a binary tree of parent nodes whose left subtree always holds
 * the largest power of two of chunks. The speed comes from hashing many independent inputs (whole
 * chunks, or parents of one tree level) side by side, one per SIMD lane: hash_many() below, with an
 * AVX-512 kernel (16 lanes) picked at run time and a portable one-at-a-time fallback.
 *
 * Words are read and written in host order: only little-endian hosts are supported. */
#include "blake3.h"

#include <immintrin.h>
#include <string.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "native/blake3.c assumes a little-endian host"
#endif

enum { BLOCK_LEN = 64, CHUNK_LEN = 1024 };
/* Whole input is cut into groups of GROUP_CHUNKS chunks: each group's subtree is reduced level by
 * level with SIMD parents, and groups are joined with a small CV stack. 128 chunks = 128 KiB, the
 * largest CDC chunk, so a chunk id is always one group. */
enum { GROUP_CHUNKS = 128, GROUP_LEN = GROUP_CHUNKS * CHUNK_LEN };
enum { CHUNK_START = 1, CHUNK_END = 2, PARENT = 4, ROOT = 8 };

static const uint32_t IV[8] = {0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
                               0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19};

/* Message word order for each of the 7 rounds: row r+1 is row r put through the spec's permutation
 * (2,6,3,10,7,0,4,13,1,11,12,5,9,14,15,8), so no words are moved at run time. */
static const uint8_t SCHEDULE[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

/* ---- portable compression ---------------------------------------------------------------- */

static inline uint32_t rotr32(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

#define G(a, b, c, d, x, y)                                                                    \
    do {                                                                                       \
        a = a + b + (x); d = rotr32(d ^ a, 16); c = c + d; b = rotr32(b ^ c, 12);              \
        a = a + b + (y); d = rotr32(d ^ a, 8);  c = c + d; b = rotr32(b ^ c, 7);               \
    } while (0)

/* out = first half of the compression output (the next CV). out may alias cv. */
static void compress(const uint32_t cv[8], const uint8_t block[BLOCK_LEN], uint32_t block_len,
                     uint64_t counter, uint32_t flags, uint32_t out[8])
{
    uint32_t m[16], v[16];
    memcpy(m, block, BLOCK_LEN);
    memcpy(v, cv, 32);
    memcpy(v + 8, IV, 16);
    v[12] = (uint32_t)counter;
    v[13] = (uint32_t)(counter >> 32);
    v[14] = block_len;
    v[15] = flags;
    for (int r = 0; r < 7; r++) {
        const uint8_t *s = SCHEDULE[r];
        G(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
        G(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
        G(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
        G(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
        G(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
        G(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
        G(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
        G(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++)
        out[i] = v[i] ^ v[i + 8];
}
#undef G

/* CV of one chunk of len (0..1024) bytes; last_flags is ROOT when the chunk is the whole input. */
static void chunk_cv(const uint8_t *in, size_t len, uint64_t counter, uint32_t last_flags,
                     uint32_t out[8])
{
    size_t nblocks = len ? (len + BLOCK_LEN - 1) / BLOCK_LEN : 1;
    memcpy(out, IV, 32);
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
        compress(out, block, (uint32_t)blen, counter, flags, out);
    }
}

static void parent_cv(const uint32_t left[8], const uint32_t right[8], uint32_t flags, uint32_t out[8])
{
    uint32_t block[16];
    memcpy(block, left, 32);
    memcpy(block + 8, right, 32);
    compress(IV, (const uint8_t *)block, BLOCK_LEN, 0, PARENT | flags, out);
}

/* ---- many inputs at once ------------------------------------------------------------------ */

/* Hash n inputs of `blocks` full blocks each, input i at in + i * stride, into n CVs at out + 8 * i.
 * Input i uses counter + i when inc is set, else counter (parents use 0). The first block of each
 * input gets start_flags added, the last end_flags. Whole chunks: blocks = 16, stride = 1024,
 * inc = 1, start/end = CHUNK_START/CHUNK_END. One tree level of parents: blocks = 1, stride = 64,
 * flags = PARENT. A kernel handles n <= its lane count; reads all inputs before writing out. */
typedef void hash_many_fn(const uint8_t *in, size_t stride, size_t n, size_t blocks, uint64_t counter,
                          int inc, uint32_t flags, uint32_t start_flags, uint32_t end_flags, uint32_t *out);

static void hash_many_portable(const uint8_t *in, size_t stride, size_t n, size_t blocks, uint64_t counter,
                               int inc, uint32_t flags, uint32_t start_flags, uint32_t end_flags,
                               uint32_t *out)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t cv[8];
        memcpy(cv, IV, 32);
        for (size_t b = 0; b < blocks; b++) {
            uint32_t f = flags | (b == 0 ? start_flags : 0) | (b + 1 == blocks ? end_flags : 0);
            compress(cv, in + i * stride + b * BLOCK_LEN, BLOCK_LEN, counter + (inc ? i : 0), f, cv);
        }
        memcpy(out + 8 * i, cv, 32);
    }
}

#define AVX512 __attribute__((target("avx512f")))

AVX512 static inline __m512i add512(__m512i a, __m512i b) { return _mm512_add_epi32(a, b); }
AVX512 static inline __m512i xorror512(__m512i a, __m512i b, int n)
{
    /* n is a constant after inlining; vprord takes an immediate. */
    switch (n) {
    case 16: return _mm512_ror_epi32(_mm512_xor_si512(a, b), 16);
    case 12: return _mm512_ror_epi32(_mm512_xor_si512(a, b), 12);
    case 8: return _mm512_ror_epi32(_mm512_xor_si512(a, b), 8);
    default: return _mm512_ror_epi32(_mm512_xor_si512(a, b), 7);
    }
}

#define G512(a, b, c, d, x, y)                                                                 \
    do {                                                                                       \
        a = add512(add512(a, b), x); d = xorror512(d, a, 16);                                  \
        c = add512(c, d); b = xorror512(b, c, 12);                                             \
        a = add512(add512(a, b), y); d = xorror512(d, a, 8);                                   \
        c = add512(c, d); b = xorror512(b, c, 7);                                              \
    } while (0)

/* 16x16 transpose of 32-bit words: row i (one block of input i) becomes lane i of every word. */
AVX512 static inline void transpose16(__m512i r[16])
{
    __m512i a[16], b[16];
    for (int i = 0; i < 8; i++) {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* b[4i+j], 128-bit lane L, holds word 4L+j of rows 4i..4i+3. */
    for (int i = 0; i < 4; i++) {
        b[4 * i + 0] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    /* Gather lane L of b[j], b[4+j], b[8+j], b[12+j] into word 4L+j. */
    for (int j = 0; j < 4; j++) {
        __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88);     /* lanes 0,2 | 0,2 */
        __m512i d0 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88);
        __m512i c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);     /* lanes 1,3 | 1,3 */
        __m512i d1 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
        r[j] = _mm512_shuffle_i32x4(c0, d0, 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(c0, d0, 0xDD);
        r[4 + j] = _mm512_shuffle_i32x4(c1, d1, 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(c1, d1, 0xDD);
    }
}

AVX512 static void hash_many_avx512(const uint8_t *in, size_t stride, size_t n, size_t blocks,
                                    uint64_t counter, int inc, uint32_t flags, uint32_t start_flags,
                                    uint32_t end_flags, uint32_t *out)
{
    uint32_t lo[16], hi[16], words[8][16];
    const uint8_t *src[16];
    for (size_t i = 0; i < 16; i++) {
        uint64_t c = counter + (inc ? i : 0);
        lo[i] = (uint32_t)c;
        hi[i] = (uint32_t)(c >> 32);
        src[i] = in + (i < n ? i : 0) * stride; /* unused lanes re-hash input 0 */
    }
    const __m512i ctr_lo = _mm512_loadu_si512(lo), ctr_hi = _mm512_loadu_si512(hi);
    __m512i h[8];
    for (int i = 0; i < 8; i++)
        h[i] = _mm512_set1_epi32((int)IV[i]);
    for (size_t b = 0; b < blocks; b++) {
        __m512i m[16], v[16];
        /* Sixteen streams 1 KiB apart defeat the hardware prefetcher; ask for each a few blocks
         * ahead (a prefetch past the end of the input is harmless). */
        for (int i = 0; i < 16; i++) {
            _mm_prefetch((const char *)src[i] + b * BLOCK_LEN + 256, _MM_HINT_T0);
            m[i] = _mm512_loadu_si512(src[i] + b * BLOCK_LEN);
        }
        transpose16(m);
        uint32_t f = flags | (b == 0 ? start_flags : 0) | (b + 1 == blocks ? end_flags : 0);
        for (int i = 0; i < 8; i++)
            v[i] = h[i];
        for (int i = 0; i < 4; i++)
            v[8 + i] = _mm512_set1_epi32((int)IV[i]);
        v[12] = ctr_lo;
        v[13] = ctr_hi;
        v[14] = _mm512_set1_epi32(BLOCK_LEN);
        v[15] = _mm512_set1_epi32((int)f);
#pragma GCC unroll 7
        for (int r = 0; r < 7; r++) {
            const uint8_t *s = SCHEDULE[r];
            G512(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
            G512(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
            G512(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
            G512(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
            G512(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
            G512(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
            G512(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
            G512(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
        }
        for (int i = 0; i < 8; i++)
            h[i] = _mm512_xor_si512(v[i], v[i + 8]);
    }
    for (int i = 0; i < 8; i++)
        _mm512_storeu_si512(words[i], h[i]);
    for (size_t lane = 0; lane < n; lane++)
        for (int i = 0; i < 8; i++)
            out[8 * lane + i] = words[i][lane];
}

static hash_many_fn *kernel = hash_many_portable;
static size_t kernel_lanes = 1;
static const char *kernel_name = "portable";

void blake3_init(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        kernel = hash_many_avx512;
        kernel_lanes = 16;
        kernel_name = "avx512";
    }
}

const char *blake3_kernel(void) { return kernel_name; }

static void hash_many(const uint8_t *in, size_t stride, size_t n, size_t blocks, uint64_t counter, int inc,
                      uint32_t flags, uint32_t start_flags, uint32_t end_flags, uint32_t *out)
{
    while (n) {
        size_t k = n < kernel_lanes ? n : kernel_lanes;
        /* A lone input is cheaper one-at-a-time than in a mostly empty SIMD batch. */
        hash_many_fn *fn = k == 1 ? hash_many_portable : kernel;
        fn(in, stride, k, blocks, counter, inc, flags, start_flags, end_flags, out);
        in += k * stride;
        counter += inc ? k : 0;
        out += 8 * k;
        n -= k;
    }
}

/* ---- tree --------------------------------------------------------------------------------- */

/* CV of the subtree over len (1..GROUP_LEN) bytes whose first chunk has number counter; with root set
 * it is the whole input and out is its hash. Levels are reduced pairwise left to right, an odd last
 * node moving up unchanged: that gives exactly the spec's left-heavy tree. */
static void subtree_cv(const uint8_t *in, size_t len, uint64_t counter, int root, uint32_t out[8])
{
    uint32_t cvs[GROUP_CHUNKS * 8];
    size_t n = (len + CHUNK_LEN - 1) / CHUNK_LEN, full = len / CHUNK_LEN;
    if (n == 1) {
        chunk_cv(in, len, counter, root ? ROOT : 0, out);
        return;
    }
    hash_many(in, CHUNK_LEN, full, CHUNK_LEN / BLOCK_LEN, counter, 1, 0, CHUNK_START, CHUNK_END, cvs);
    if (full < n)
        chunk_cv(in + full * CHUNK_LEN, len - full * CHUNK_LEN, counter + full, 0, cvs + 8 * full);
    while (n > 2) {
        size_t pairs = n / 2;
        /* In place: batch k writes where batch k/2 read, and each batch reads before writing. */
        hash_many((const uint8_t *)cvs, BLOCK_LEN, pairs, 1, 0, 0, PARENT, 0, 0, cvs);
        if (n & 1)
            memcpy(cvs + 8 * pairs, cvs + 8 * (n - 1), 32);
        n = pairs + (n & 1);
    }
    parent_cv(cvs, cvs + 8, root ? ROOT : 0, out);
}

void blake3(const uint8_t *in, size_t len, uint8_t out[BLAKE3_OUT_LEN])
{
    uint32_t stack[64][8], cv[8];
    size_t depth = 0;
    /* Every group but the one holding the last byte is complete and has input after it, so it can be
     * merged into the stack eagerly (the spec's "merge when more input follows"). */
    uint64_t groups = len ? (len - 1) / GROUP_LEN : 0;
    for (uint64_t g = 0; g < groups; g++) {
        subtree_cv(in + g * GROUP_LEN, GROUP_LEN, g * GROUP_CHUNKS, 0, cv);
        for (uint64_t total = g + 1; !(total & 1); total >>= 1)
            parent_cv(stack[--depth], cv, 0, cv);
        memcpy(stack[depth++], cv, 32);
    }
    if (len == 0)
        chunk_cv(in, 0, 0, ROOT, cv);
    else
        subtree_cv(in + groups * GROUP_LEN, len - groups * GROUP_LEN, groups * GROUP_CHUNKS, groups == 0, cv);
    while (depth) {
        depth--;
        parent_cv(stack[depth], cv, depth == 0 ? ROOT : 0, cv);
    }
    memcpy(out, cv, BLAKE3_OUT_LEN);
}
