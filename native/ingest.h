/* One pass over a file: sha256 of all of it, chunks as cdc_run() cuts them, and a copy. */
#ifndef CLOWDER_INGEST_H
#define CLOWDER_INGEST_H

#include "chunker.h"

typedef struct {
    const uint8_t *data; /* NULL when size == 0 */
    uint64_t size;
} ingest_src;

/* Maps the whole of fd (its size now) read-only. Returns 0 or an errno value. */
int ingest_map(int fd, ingest_src *src);
void ingest_unmap(ingest_src *src);

/* sha256 on a thread of its own while cdc_run() chunks, hashes and copies to dst_fd (-1: no copy) on
 * `threads` others. Returns 0, an errno value, or -1 if OpenSSL failed. Call without the GIL. */
int ingest_run(const ingest_src *src, int dst_fd, const uint64_t *cuts, size_t ncuts, const cdc_params *p,
               int threads, uint8_t sha256[32], cdc_chunks *out);

#endif
