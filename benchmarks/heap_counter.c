/* Counts the bytes of the C heap in use and their peak, for benchmarks/memory.py.

Preloaded (LD_PRELOAD) into a child process, it wraps glibc's allocation functions:
every block's usable size is added when allocated and taken off when freed, so the
peak is exact (every tensor, autograd node and Python object) and nothing in the
measured process changes. heap_counter_reset() starts a new peak from the bytes in use
now and returns them; heap_counter_peak() returns the peak since. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdatomic.h>
#include <stddef.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_valloc(size_t);
extern void *__libc_pvalloc(size_t);
extern void __libc_free(void *);

static _Atomic size_t in_use, peak;

static void *counted(void *p) {
    if (p) {
        size_t now = atomic_fetch_add(&in_use, malloc_usable_size(p)) + malloc_usable_size(p);
        size_t old = atomic_load(&peak);
        while (now > old && !atomic_compare_exchange_weak(&peak, &old, now)) {
        }
    }
    return p;
}

static void uncount(void *p) {
    if (p) atomic_fetch_sub(&in_use, malloc_usable_size(p));
}

void *malloc(size_t n) { return counted(__libc_malloc(n)); }
void *calloc(size_t n, size_t size) { return counted(__libc_calloc(n, size)); }
void free(void *p) {
    uncount(p);
    __libc_free(p);
}
void *realloc(void *p, size_t n) {
    size_t before = p ? malloc_usable_size(p) : 0;
    void *q = __libc_realloc(p, n);
    if (q || n == 0) atomic_fetch_sub(&in_use, before);
    return counted(q);
}
void *memalign(size_t alignment, size_t n) { return counted(__libc_memalign(alignment, n)); }
void *aligned_alloc(size_t alignment, size_t n) { return memalign(alignment, n); }
void *valloc(size_t n) { return counted(__libc_valloc(n)); }
void *pvalloc(size_t n) { return counted(__libc_pvalloc(n)); }
int posix_memalign(void **out, size_t alignment, size_t n) {
    void *p = memalign(alignment, n);
    if (!p && n) return ENOMEM;
    *out = p;
    return 0;
}

size_t heap_counter_reset(void) {
    size_t now = atomic_load(&in_use);
    atomic_store(&peak, now);
    return now;
}
size_t heap_counter_peak(void) { return atomic_load(&peak); }
