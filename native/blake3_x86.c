/* BLAKE3's x86 SIMD kernels, each compiled for its instruction set with a target attribute (no global -m
 * flags), so one build runs on any x86-64 CPU and blake3.c picks at run time what the CPU has:
 *
 *   avx512  16 inputs in the 32-bit lanes of a zmm register, 8 in a ymm (for batches of 2..8, which a
 *           half-empty zmm would waste), native rotates (vprord) everywhere
 *   avx2    8 inputs in a ymm; rotates by 16 and 8 as one byte shuffle, by 12 and 7 as shift/shift/or
 *   sse41   4 inputs in an xmm, rotates as for avx2
 *
 * A lone input (a chunk's last partial chunk, a lone parent, the root) is compressed with the state's
 * four rows in four xmm registers (blake3_rows.h), with each kernel's rotates.
 *
 * The round logic is blake3_impl.h's B3_ROUND on GCC vector types; only the rotates and the transposes
 * of message words into lanes are written per instruction set. */
/* See B3_G in blake3_impl.h: pins the order of the quarter-round's first additions. */
#define B3_PIN(x) ({ __typeof__(x) pin_ = (x); __asm__("" : "+v"(pin_)); pin_; })
#include "blake3_impl.h"

/* GCC 8 or later (target attributes, AVX-512 intrinsics, "#pragma GCC unroll"). Other compilers, clang
 * included (untested here), and other CPUs build the portable kernel only. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8

#include <immintrin.h>
#include <string.h>

typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

/* ---- rotates ------------------------------------------------------------------------------ */

#define ROTR_SHIFT(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
/* Rotating 32-bit lanes by 16 or 8 moves whole bytes: one byte shuffle. */
#define ROT16_BYTES 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13
#define ROT8_BYTES 1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12
#define ROTR_SSSE3(x, n)                                                                       \
    ((n) == 16 ? (u32x4)_mm_shuffle_epi8((__m128i)(x), _mm_setr_epi8(ROT16_BYTES))            \
     : (n) == 8 ? (u32x4)_mm_shuffle_epi8((__m128i)(x), _mm_setr_epi8(ROT8_BYTES))            \
                : ROTR_SHIFT(x, n))
#define ROTR_AVX2(x, n)                                                                        \
    ((n) == 16 ? (u32x8)_mm256_shuffle_epi8((__m256i)(x), _mm256_setr_epi8(ROT16_BYTES, ROT16_BYTES)) \
     : (n) == 8 ? (u32x8)_mm256_shuffle_epi8((__m256i)(x), _mm256_setr_epi8(ROT8_BYTES, ROT8_BYTES)) \
                : ROTR_SHIFT(x, n))
#define ROTR_AVX512(x, n) ((u32x16)_mm512_ror_epi32((__m512i)(x), n))
#define ROTR_AVX512VL(x, n) ((u32x8)_mm256_ror_epi32((__m256i)(x), n))

/* ---- transposes: v[i] word j <-> v[j] word i ---------------------------------------------- */

/* The first two steps of every width: within each 128-bit lane, each group of 4 rows r[k..k+3] is
 * transposed as 4x4 words, so that out[k + j], lane L, holds word 4L + j of rows k..k+3. T is the
 * vector type, U the intrinsics' prefix (_mm, _mm256, _mm512), n the number of rows. */
#define TRANSPOSE_4X4_IN_LANES(T, U, r, out, n)                                                \
    do {                                                                                       \
        T a_[n];                                                                               \
        for (int i_ = 0; i_ < (n); i_ += 2) {                                                  \
            a_[i_] = U##_unpacklo_epi32((T)r[i_], (T)r[i_ + 1]);                               \
            a_[i_ + 1] = U##_unpackhi_epi32((T)r[i_], (T)r[i_ + 1]);                           \
        }                                                                                      \
        for (int i_ = 0; i_ < (n); i_ += 4) {                                                  \
            out[i_] = U##_unpacklo_epi64(a_[i_], a_[i_ + 2]);                                  \
            out[i_ + 1] = U##_unpackhi_epi64(a_[i_], a_[i_ + 2]);                              \
            out[i_ + 2] = U##_unpacklo_epi64(a_[i_ + 1], a_[i_ + 3]);                          \
            out[i_ + 3] = U##_unpackhi_epi64(a_[i_ + 1], a_[i_ + 3]);                          \
        }                                                                                      \
    } while (0)

__attribute__((target("sse4.1"))) static inline void transpose4(u32x4 v[4])
{
    __m128i b[4];
    TRANSPOSE_4X4_IN_LANES(__m128i, _mm, v, b, 4);
    for (int j = 0; j < 4; j++)
        v[j] = (u32x4)b[j];
}

/* b[j] holds word j of rows 0-3 (low half) and word 4+j (high half); b[4+j] the same of rows 4-7. */
__attribute__((target("avx2"))) static inline void transpose8(u32x8 v[8])
{
    __m256i b[8];
    TRANSPOSE_4X4_IN_LANES(__m256i, _mm256, v, b, 8);
    for (int j = 0; j < 4; j++) {
        v[j] = (u32x8)_mm256_permute2x128_si256(b[j], b[4 + j], 0x20);
        v[4 + j] = (u32x8)_mm256_permute2x128_si256(b[j], b[4 + j], 0x31);
    }
}

/* b[4i+j], 128-bit lane L, holds word 4L+j of rows 4i..4i+3: gather lane L of b[j], b[4+j], b[8+j],
 * b[12+j] into word 4L+j. */
__attribute__((target("avx512f"))) static inline void transpose16(u32x16 v[16])
{
    __m512i b[16];
    TRANSPOSE_4X4_IN_LANES(__m512i, _mm512, v, b, 16);
    for (int j = 0; j < 4; j++) {
        __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88); /* lanes 0,2 | 0,2 */
        __m512i d0 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88);
        __m512i c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD); /* lanes 1,3 | 1,3 */
        __m512i d1 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
        v[j] = (u32x16)_mm512_shuffle_i32x4(c0, d0, 0x88);
        v[8 + j] = (u32x16)_mm512_shuffle_i32x4(c0, d0, 0xDD);
        v[4 + j] = (u32x16)_mm512_shuffle_i32x4(c1, d1, 0x88);
        v[12 + j] = (u32x16)_mm512_shuffle_i32x4(c1, d1, 0xDD);
    }
}

/* ---- many inputs: the lane kernels ---------------------------------------------------------- */

#define LANES 16
#define VEC u32x16
#define LANES_TARGET "avx512f"
#define LANES_NAME hash16_avx512
#define ROTR ROTR_AVX512
#define TRANSPOSE transpose16
#include "blake3_lanes.h"

#define LANES 8
#define VEC u32x8
#define LANES_TARGET "avx2,avx512f,avx512vl"
#define LANES_NAME hash8_avx512
#define ROTR ROTR_AVX512VL
#define TRANSPOSE transpose8
#include "blake3_lanes.h"

#define LANES 8
#define VEC u32x8
#define LANES_TARGET "avx2"
#define LANES_NAME hash8_avx2
#define ROTR ROTR_AVX2
#define TRANSPOSE transpose8
#include "blake3_lanes.h"

#define LANES 4
#define VEC u32x4
#define LANES_TARGET "sse4.1"
#define LANES_NAME hash4_sse41
#define ROTR ROTR_SSSE3
#define TRANSPOSE transpose4
#include "blake3_lanes.h"

/* ---- one input: the state's rows in four vectors ------------------------------------------- */

/* Where the CPU has AVX the rows are VEX-encoded: legacy SSE instructions run after AVX-512 code (ours,
 * or anything else in the process) were measured to make the whole chunker a third slower. */
#define ROWS_TARGET "avx512f,avx512vl"
#define ROWS_NAME compress_avx512
#define ROTR(x, n) ((u32x4)_mm_ror_epi32((__m128i)(x), n))
#include "blake3_rows.h"

#define ROWS_TARGET "avx2"
#define ROWS_NAME compress_avx2
#define ROTR ROTR_SSSE3
#include "blake3_rows.h"

#define ROWS_TARGET "sse4.1"
#define ROWS_NAME compress_sse41
#define ROTR ROTR_SSSE3
#include "blake3_rows.h"

/* ---- the kernels ---------------------------------------------------------------------------- */

static const b3_kernel AVX512 = {"avx512", compress_avx512, {{hash16_avx512, 16}, {hash8_avx512, 8}}};
static const b3_kernel AVX2 = {"avx2", compress_avx2, {{hash8_avx2, 8}, {NULL, 0}}};
static const b3_kernel SSE41 = {"sse41", compress_sse41, {{hash4_sse41, 4}, {NULL, 0}}};

size_t blake3_simd_kernels(const b3_kernel *out[3])
{
    size_t n = 0;
    __builtin_cpu_init(); /* __builtin_cpu_supports also checks that the OS saves the registers */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
        out[n++] = &AVX512;
    if (__builtin_cpu_supports("avx2"))
        out[n++] = &AVX2;
    if (__builtin_cpu_supports("sse4.1"))
        out[n++] = &SSE41;
    return n;
}

#else

size_t blake3_simd_kernels(const b3_kernel *out[3])
{
    (void)out;
    return 0;
}

#endif
