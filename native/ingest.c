/* ingest(): the store's write path. The source is mmapped, so the bytes are read from the page cache
 * with no copy into our memory; sha256 (serial by nature, about 0.5 s/GB even with SHA-NI) runs on
 * its own thread over the mapping while the chunker threads cut, BLAKE3 and pwrite the same mapping,
 * so the whole takes about as long as the longer of the two rather than their sum. */
#define _GNU_SOURCE
#include "ingest.h"

#include <errno.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

int ingest_map(int fd, ingest_src *src)
{
    struct stat st;
    src->data = NULL;
    src->size = 0;
    if (fstat(fd, &st) < 0)
        return errno;
    if (!S_ISREG(st.st_mode))
        return S_ISDIR(st.st_mode) ? EISDIR : EINVAL; /* a pipe or socket cannot be mapped */
    if (st.st_size == 0)
        return 0;
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        return errno;
    madvise(m, (size_t)st.st_size, MADV_SEQUENTIAL); /* a hint: failure changes nothing */
    src->data = m;
    src->size = (uint64_t)st.st_size;
    return 0;
}

void ingest_unmap(ingest_src *src)
{
    if (src->data)
        munmap((void *)src->data, src->size);
    src->data = NULL;
    src->size = 0;
}

typedef struct {
    const ingest_src *src;
    uint8_t *digest;
    int ok;
} sha_job;

static void *sha_thread(void *arg)
{
    sha_job *j = arg;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    j->ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
    /* Windows keep each update short; EVP takes size_t anyway. */
    for (uint64_t off = 0; j->ok && off < j->src->size; off += 4 << 20) {
        uint64_t n = j->src->size - off < (4 << 20) ? j->src->size - off : (4 << 20);
        j->ok = EVP_DigestUpdate(ctx, j->src->data + off, n);
    }
    j->ok = j->ok && EVP_DigestFinal_ex(ctx, j->digest, NULL);
    EVP_MD_CTX_free(ctx);
    return NULL;
}

int ingest_run(const ingest_src *src, int dst_fd, const uint64_t *cuts, size_t ncuts, const cdc_params *p,
               int threads, uint8_t sha256[32], cdc_chunks *out)
{
    sha_job job = {src, sha256, 0};
    pthread_t tid;
    int threaded = pthread_create(&tid, NULL, sha_thread, &job) == 0;
    int error = cdc_run(src->data, src->size, cuts, ncuts, p, threads, dst_fd, out);
    if (threaded)
        pthread_join(tid, NULL);
    else
        sha_thread(&job);
    if (!error && !job.ok)
        error = -1;
    if (error) {
        free(out->v);
        memset(out, 0, sizeof *out);
    }
    return error;
}
