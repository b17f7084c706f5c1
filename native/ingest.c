/* ingest(): the store's write path. The source is mmapped, so the bytes are read from the page cache
 * with no copy into our memory; sha256 (serial by nature, about 0.5 s/GB even with SHA-NI) runs on
 * its own thread over the mapping while the chunker threads cut, BLAKE3 and pwrite the same mapping,
 * so the whole takes about as long as the longer of the two rather than their sum. */
#define _GNU_SOURCE
#include "ingest.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

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

/* ---- the copy, by direct I/O ------------------------------------------------------------
 * The mapping is page-aligned, so the copy can be O_DIRECT writes straight from the source's page
 * cache pages to the device: no memcpy into the destination's page cache and no dirty pages left
 * for fsync to write back, which on two cores is CPU the sha256 thread needs. The last partial
 * block goes through an aligned bounce buffer, zero-padded, and ftruncate trims the padding. */

enum { DIRECT_ALIGN = 4096, DIRECT_WINDOW = 8 << 20 };

typedef struct {
    const ingest_src *src;
    int fd;
    int flags; /* fd's flags before O_DIRECT was turned on */
    int direct;
    int error;
} copy_job;

/* A device that wants coarser alignment than DIRECT_ALIGN refuses the write with EINVAL: direct
 * I/O goes off and this write and the rest go through the page cache. */
static int copy_range(copy_job *j, const uint8_t *buf, uint64_t len, uint64_t off)
{
    int e = cdc_write_all(j->fd, buf, len, off);
    if (e == EINVAL && j->direct) {
        j->direct = 0;
        if (fcntl(j->fd, F_SETFL, j->flags) < 0)
            return errno;
        e = cdc_write_all(j->fd, buf, len, off);
    }
    return e;
}

static void *copy_thread(void *arg)
{
    copy_job *j = arg;
    uint64_t size = j->src->size, whole = size - size % DIRECT_ALIGN;
    for (uint64_t off = 0; off < whole && !j->error; off += DIRECT_WINDOW) {
        size_t n = whole - off < DIRECT_WINDOW ? (size_t)(whole - off) : DIRECT_WINDOW;
        j->error = copy_range(j, j->src->data + off, n, off);
    }
    if (j->error || whole == size)
        return NULL;
    if (!j->direct) {
        j->error = copy_range(j, j->src->data + whole, size - whole, whole);
        return NULL;
    }
    void *bounce;
    if (posix_memalign(&bounce, DIRECT_ALIGN, DIRECT_ALIGN)) {
        j->error = ENOMEM;
        return NULL;
    }
    memset(bounce, 0, DIRECT_ALIGN);
    memcpy(bounce, j->src->data + whole, size - whole);
    j->error = copy_range(j, bounce, DIRECT_ALIGN, whole);
    free(bounce);
    if (!j->error && ftruncate(j->fd, (off_t)size) < 0)
        j->error = errno;
    return NULL;
}

int ingest_run(const ingest_src *src, int dst_fd, const uint64_t *cuts, size_t ncuts, const cdc_params *p,
               int threads, uint8_t sha256[32], cdc_chunks *out)
{
    sha_job job = {src, sha256, 0};
    pthread_t tid, copy_tid;
    int threaded = pthread_create(&tid, NULL, sha_thread, &job) == 0;
    int flags = dst_fd >= 0 ? fcntl(dst_fd, F_GETFL) : -1;
    int direct = flags >= 0 && src->size && fcntl(dst_fd, F_SETFL, flags | O_DIRECT) == 0;
    copy_job copy = {src, dst_fd, flags, direct, 0};
    int copying = direct && pthread_create(&copy_tid, NULL, copy_thread, &copy) == 0;
    if (direct && !copying)
        copy_thread(&copy);
    int error = cdc_run(src->data, src->size, cuts, ncuts, p, threads, direct ? -1 : dst_fd, out);
    if (copying)
        pthread_join(copy_tid, NULL);
    if (direct)
        fcntl(dst_fd, F_SETFL, flags);
    if (!error)
        error = copy.error;
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
