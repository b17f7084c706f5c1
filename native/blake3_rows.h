/* A compress_fn (blake3_impl.h) for one input: the 16 state words as four rows of four, one row per
 * 128-bit vector, so that the four column quarter-rounds of a round are one vector B3_G, and the four
 * diagonal ones another after rotating rows 1, 2, 3 left by 1, 2, 3 words. blake3_x86.c includes this
 * file once per instruction set, after defining:
 *   ROWS_TARGET      the instruction sets, for __attribute__((target))
 *   ROWS_NAME        the function's name
 *   ROTR(x, n)       each lane of the u32x4 x rotated right by n (n is 16, 12, 8 or 7)
 * and #undefs them afterwards. */

__attribute__((target(ROWS_TARGET))) static void ROWS_NAME(const uint32_t cv[8], const uint8_t block[BLOCK_LEN],
                                                           uint32_t block_len, uint64_t counter, uint32_t flags,
                                                           uint32_t out[8])
{
    uint32_t m[16];
    u32x4 row0, row1, row2, row3 = {(uint32_t)counter, (uint32_t)(counter >> 32), block_len, flags};
    memcpy(m, block, BLOCK_LEN);
    memcpy(&row0, cv, 16);
    memcpy(&row1, cv + 4, 16);
    memcpy(&row2, BLAKE3_IV, 16);
#pragma GCC unroll 7
    for (int r = 0; r < 7; r++) {
        const uint8_t *s = BLAKE3_SCHEDULE[r];
        B3_G(row0, row1, row2, row3, ((u32x4){m[s[0]], m[s[2]], m[s[4]], m[s[6]]}),
             ((u32x4){m[s[1]], m[s[3]], m[s[5]], m[s[7]]}), ROTR);
        row1 = (u32x4)_mm_shuffle_epi32((__m128i)row1, _MM_SHUFFLE(0, 3, 2, 1));
        row2 = (u32x4)_mm_shuffle_epi32((__m128i)row2, _MM_SHUFFLE(1, 0, 3, 2));
        row3 = (u32x4)_mm_shuffle_epi32((__m128i)row3, _MM_SHUFFLE(2, 1, 0, 3));
        B3_G(row0, row1, row2, row3, ((u32x4){m[s[8]], m[s[10]], m[s[12]], m[s[14]]}),
             ((u32x4){m[s[9]], m[s[11]], m[s[13]], m[s[15]]}), ROTR);
        row1 = (u32x4)_mm_shuffle_epi32((__m128i)row1, _MM_SHUFFLE(2, 1, 0, 3));
        row2 = (u32x4)_mm_shuffle_epi32((__m128i)row2, _MM_SHUFFLE(1, 0, 3, 2));
        row3 = (u32x4)_mm_shuffle_epi32((__m128i)row3, _MM_SHUFFLE(0, 3, 2, 1));
    }
    row0 ^= row2;
    row1 ^= row3;
    memcpy(out, &row0, 16);
    memcpy(out + 4, &row1, 16);
}

#undef ROWS_TARGET
#undef ROWS_NAME
#undef ROTR
