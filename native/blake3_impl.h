/* Inside BLAKE3: what blake3.c (the tree, the portable kernel, the choice of kernel) shares with the SIMD
 * kernels in blake3_x86.c. Not part of the extension's interface. */
#ifndef CLOWDER_BLAKE3_IMPL_H
#define CLOWDER_BLAKE3_IMPL_H

#include <stddef.h>
#include <stdint.h>

enum { BLOCK_LEN = 64, CHUNK_LEN = 1024 };
enum { CHUNK_START = 1, CHUNK_END = 2, PARENT = 4, ROOT = 8 };

/* Defined here, not extern: a kernel's message indexing must be known at compile time, so that after
 * unrolling every word sits in its own register instead of an array indexed at run time. */
static const uint32_t BLAKE3_IV[8] = {0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
                                      0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19};

/* Message word order for each of the 7 rounds: row r+1 is row r put through the spec's permutation
 * (2,6,3,10,7,0,4,13,1,11,12,5,9,14,15,8), so no words are moved at run time. */
static const uint8_t BLAKE3_SCHEDULE[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

/* The quarter-round and the round, for any type with + and ^ (a 32-bit word, or a vector of words, one
 * per lane) and a rotate-right ROTR(x, n) for n in 16, 12, 8, 7. Every kernel is written with these.
 *
 * a + x is added before b: b is the value the previous step just rotated, so adding it last keeps the
 * quarter-round's chain of dependent instructions one add shorter. Left alone, GCC reassociates the sum
 * into (x + b) + a, which made the AVX-512 kernel a quarter slower; the SIMD kernels define B3_PIN as
 * an empty asm that makes the compiler materialise a + x as written. */
#ifndef B3_PIN
#define B3_PIN(x) (x)
#endif
#define B3_G(a, b, c, d, x, y, ROTR)                                                           \
    do {                                                                                       \
        a = B3_PIN(a + (x)) + b; d = ROTR(d ^ a, 16); c = c + d; b = ROTR(b ^ c, 12);          \
        a = B3_PIN(a + (y)) + b; d = ROTR(d ^ a, 8);  c = c + d; b = ROTR(b ^ c, 7);           \
    } while (0)

/* Two independent quarter-rounds step by step, so that the instructions that can issue together sit
 * together (the AVX2 and SSE4.1 kernels measured 4% faster than with one quarter-round after the other;
 * four at a time made GCC spill their 16 registers). */
#define B3_G2(a, b, c, d, x, y, A, B, C, D, X, Y, ROTR)                                        \
    do {                                                                                       \
        a = B3_PIN(a + (x)) + b; A = B3_PIN(A + (X)) + B;                                      \
        d = ROTR(d ^ a, 16);     D = ROTR(D ^ A, 16);                                          \
        c = c + d;               C = C + D;                                                    \
        b = ROTR(b ^ c, 12);     B = ROTR(B ^ C, 12);                                          \
        a = B3_PIN(a + (y)) + b; A = B3_PIN(A + (Y)) + B;                                      \
        d = ROTR(d ^ a, 8);      D = ROTR(D ^ A, 8);                                           \
        c = c + d;               C = C + D;                                                    \
        b = ROTR(b ^ c, 7);      B = ROTR(B ^ C, 7);                                           \
    } while (0)

/* Round r on the 16 state words v[] with message words m[]: columns, then diagonals. */
#define B3_ROUND(v, m, r, ROTR)                                                                \
    do {                                                                                       \
        const uint8_t *s_ = BLAKE3_SCHEDULE[r];                                                \
        B3_G2(v[0], v[4], v[8], v[12], m[s_[0]], m[s_[1]],                                     \
              v[1], v[5], v[9], v[13], m[s_[2]], m[s_[3]], ROTR);                              \
        B3_G2(v[2], v[6], v[10], v[14], m[s_[4]], m[s_[5]],                                    \
              v[3], v[7], v[11], v[15], m[s_[6]], m[s_[7]], ROTR);                             \
        B3_G2(v[0], v[5], v[10], v[15], m[s_[8]], m[s_[9]],                                    \
              v[1], v[6], v[11], v[12], m[s_[10]], m[s_[11]], ROTR);                           \
        B3_G2(v[2], v[7], v[8], v[13], m[s_[12]], m[s_[13]],                                   \
              v[3], v[4], v[9], v[14], m[s_[14]], m[s_[15]], ROTR);                            \
    } while (0)

/* One compression of a 64-byte block (the spec's compression function, first half of the output: the
 * next CV). out may alias cv. */
typedef void compress_fn(const uint32_t cv[8], const uint8_t block[BLOCK_LEN], uint32_t block_len,
                         uint64_t counter, uint32_t flags, uint32_t out[8]);

/* Hash n inputs (1 <= n <= the kernel's lanes) of `blocks` full blocks each, input i at in + i * stride,
 * into n CVs at out + 8 * i, side by side in SIMD lanes. Input i uses counter + i when inc is set, else
 * counter. The first block of each input gets start_flags added, the last end_flags. Whole chunks:
 * blocks = 16, stride = 1024, inc = 1, CHUNK_START / CHUNK_END. One tree level of parents: blocks = 1,
 * stride = 64, flags = PARENT. Reads all inputs before writing out (parents are reduced in place). */
typedef void hash_many_fn(const uint8_t *in, size_t stride, size_t n, size_t blocks, uint64_t counter,
                          int inc, uint32_t flags, uint32_t start_flags, uint32_t end_flags, uint32_t *out);

/* A kernel: the compression of one block, and up to two SIMD widths for many inputs (widest first;
 * lanes 0 = none). blake3.c gives each batch the narrowest width that holds it. */
typedef struct {
    const char *name;
    compress_fn *compress;
    struct {
        hash_many_fn *fn;
        size_t lanes;
    } simd[2];
} b3_kernel;

/* Fills out[] with the SIMD kernels this build has and this CPU runs, fastest first; returns how many
 * (at most 3; 0 where the compiler cannot target x86 SIMD). blake3_x86.c. */
size_t blake3_simd_kernels(const b3_kernel *out[3]);

#endif
