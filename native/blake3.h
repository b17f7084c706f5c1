/* BLAKE3 (unkeyed hash mode, 32-byte output), written from the BLAKE3 specification. */
#ifndef CLOWDER_BLAKE3_H
#define CLOWDER_BLAKE3_H

#include <stddef.h>
#include <stdint.h>

#define BLAKE3_OUT_LEN 32

/* Must be called once before blake3() (picks the SIMD kernel for this CPU). Idempotent. */
void blake3_init(void);

/* Name of the kernel blake3_init() picked: "avx512", "avx2" or "portable". */
const char *blake3_kernel(void);

/* The BLAKE3 hash of len bytes at in. Thread-safe, no allocation. */
void blake3(const uint8_t *in, size_t len, uint8_t out[BLAKE3_OUT_LEN]);

#endif
