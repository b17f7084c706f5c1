/* FastCDC content-defined chunking with forced cuts, serial or parallel, each chunk hashed with
 * BLAKE3; optionally copying the bytes to a file descriptor as they are processed (for ingest). */
#ifndef CLOWDER_CHUNKER_H
#define CLOWDER_CHUNKER_H

#include <stddef.h>
#include <stdint.h>

#define CDC_MIN_SIZE (8 * 1024)
#define CDC_AVG_SIZE (64 * 1024)
#define CDC_MAX_SIZE (128 * 1024)

typedef struct {
    uint64_t off, len;
    uint8_t id[32]; /* BLAKE3 of the chunk's bytes */
} cdc_chunk;

typedef struct {
    cdc_chunk *v;
    size_t n, cap;
} cdc_chunks;

typedef struct {
    size_t min_size, avg_size, max_size;
} cdc_params;

/* Builds the gear table; call once before anything else here (blake3_init() too). */
void cdc_init(void);

/* NULL if the sizes are usable, else a message saying what is wrong. */
const char *cdc_check_params(const cdc_params *p);

/* NULL if cuts (ncuts offsets) are strictly increasing and inside (0, len), else a message. */
const char *cdc_check_cuts(const uint64_t *cuts, size_t ncuts, uint64_t len);

/* Cut data[0, len) into chunks: every cut is a boundary, FastCDC decides between them. threads is the
 * number of worker threads (>= 1; the result does not depend on it). If dst_fd >= 0 every byte is also
 * written to dst_fd at the same offset, with writeback started as it goes. Params and cuts must have
 * been checked. On success returns 0 and fills *out (caller frees out->v); on failure returns an errno
 * value (ENOMEM, or the write error) and leaves *out empty. Does not touch Python: call without the GIL. */
int cdc_run(const uint8_t *data, uint64_t len, const uint64_t *cuts, size_t ncuts, const cdc_params *p,
            int threads, int dst_fd, cdc_chunks *out);

/* pwrite all of buf[0, len) at off, retrying short writes and EINTR. Returns 0 or an errno value. */
int cdc_write_all(int fd, const uint8_t *buf, uint64_t len, uint64_t off);

#endif
