/* A hash_many_fn (blake3_impl.h) over LANES inputs side by side: input i lives in lane i of every vector,
 * so one vector instruction advances LANES compressions. blake3_x86.c includes this file once per vector
 * width, after defining:
 *   LANES            4, 8 or 16
 *   VEC              a GCC vector of LANES uint32_t
 *   LANES_TARGET     the instruction sets, for __attribute__((target))
 *   LANES_NAME       the function's name
 *   ROTR(x, n)       each lane of x rotated right by n (n is 16, 12, 8 or 7)
 *   TRANSPOSE(v)     transposes VEC v[LANES] in place (word j of v[i] <-> word i of v[j])
 * and #undefs them afterwards. */

__attribute__((target(LANES_TARGET))) static void LANES_NAME(const uint8_t *in, size_t stride, size_t n,
                                                             size_t blocks, uint64_t counter, int inc,
                                                             uint32_t flags, uint32_t start_flags,
                                                             uint32_t end_flags, uint32_t *out)
{
    uint32_t lo[LANES], hi[LANES];
    const uint8_t *src[LANES];
    for (size_t i = 0; i < LANES; i++) {
        uint64_t c = counter + (inc ? i : 0);
        lo[i] = (uint32_t)c;
        hi[i] = (uint32_t)(c >> 32);
        src[i] = in + (i < n ? i : 0) * stride; /* unused lanes re-hash input 0 */
    }
    VEC ctr_lo, ctr_hi, h[8];
    memcpy(&ctr_lo, lo, sizeof ctr_lo);
    memcpy(&ctr_hi, hi, sizeof ctr_hi);
    for (int i = 0; i < 8; i++)
        h[i] = (VEC){0} + BLAKE3_IV[i];
    for (size_t b = 0; b < blocks; b++) {
        /* Word w of every lane's block, as one vector: 16 / LANES transposes of LANES x LANES words. */
        VEC m[16];
        /* LANES streams a chunk apart defeat the hardware prefetcher; the next batch's inputs start
         * LANES * stride on, and asking for their block b now has them in L2 by the time that batch
         * runs (a prefetch past the end of the input is harmless). Into L2, not L1: L1 measured slower,
         * this batch and the next do not both fit there. */
        for (int i = 0; i < LANES; i++)
            _mm_prefetch((const char *)src[i] + LANES * stride + b * BLOCK_LEN, _MM_HINT_T1);
        for (int q = 0; q < 16 / LANES; q++) {
            for (int i = 0; i < LANES; i++)
                memcpy(&m[q * LANES + i], src[i] + b * BLOCK_LEN + q * LANES * 4, sizeof(VEC));
            TRANSPOSE((&m[q * LANES]));
        }
        uint32_t f = flags | (b == 0 ? start_flags : 0) | (b + 1 == blocks ? end_flags : 0);
        VEC v[16];
        for (int i = 0; i < 8; i++)
            v[i] = h[i];
        for (int i = 0; i < 4; i++)
            v[8 + i] = (VEC){0} + BLAKE3_IV[i];
        v[12] = ctr_lo;
        v[13] = ctr_hi;
        v[14] = (VEC){0} + (uint32_t)BLOCK_LEN;
        v[15] = (VEC){0} + f;
#pragma GCC unroll 7
        for (int r = 0; r < 7; r++)
            B3_ROUND(v, m, r, ROTR);
        for (int i = 0; i < 8; i++)
            h[i] = v[i] ^ v[i + 8];
    }
    /* Back to one CV per lane: transpose the 8 state vectors (padded with zeros to LANES x LANES). */
    enum { CV_PART = LANES < 8 ? LANES : 8 };
    for (int q = 0; q < 8 / CV_PART; q++) {
        VEC t[LANES];
        for (int i = 0; i < LANES; i++)
            t[i] = q * CV_PART + i < 8 && i < CV_PART ? h[q * CV_PART + i] : (VEC){0};
        TRANSPOSE(t);
        for (size_t lane = 0; lane < n; lane++)
            memcpy(out + 8 * lane + q * CV_PART, &t[lane], CV_PART * 4);
    }
}

#undef LANES
#undef VEC
#undef LANES_TARGET
#undef LANES_NAME
#undef ROTR
#undef TRANSPOSE
