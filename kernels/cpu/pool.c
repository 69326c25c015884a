/* pool.c: the CPU worker pool. n - 1 workers plus the dispatching thread
 * run one function together. A dispatch bumps an atomic generation; idle
 * workers spin on it for a while and then sleep on a futex, so a dispatch
 * costs about a microsecond when they are spinning (back-to-back kernels of
 * a decode step) and a wake-up only after a pause. The pool also owns each
 * thread's work buffer, grown by the dispatcher before a run.
 */
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "kernels/cpu/kcpu.h"

/* About 50-200 us of spinning (pause takes 40-140 cycles): long enough to
 * bridge the serial work between the kernels of one layer, short enough
 * not to hold a core when the engine is idle. */
#define POOL_SPIN 4000

struct pool_thread {
    struct k_pool *pool;
    int ith;
    pthread_t tid;
    void *work;
    size_t work_size;
} __attribute__((aligned(64)));

struct k_pool {
    int n;
    struct pool_thread *th;
    /* dispatch: written by the dispatcher before gen is bumped */
    k_pool_fn fn;
    void *ctx;
    _Alignas(64) _Atomic uint32_t gen;
    _Atomic int sleepers; /* workers asleep (or about to be) on gen */
    _Atomic int stop;
    _Alignas(64) _Atomic uint32_t pending; /* workers not yet done */
    _Atomic int waiting;                   /* dispatcher asleep on pending */
};

static void futex_wait(_Atomic uint32_t *addr, uint32_t val)
{
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL,
            0);
}

static void futex_wake(_Atomic uint32_t *addr, int n)
{
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* One step of a spin: pause, and past the first quarter yield the core
 * now and then, so that a pool larger than the machine (or a busy one)
 * lets the thread that has work run instead of the ones waiting for it. */
static inline void spin_step(int i)
{
    if (i >= POOL_SPIN / 4 && (i & 63) == 0)
        sched_yield();
    else
        cpu_relax();
}

/* Waits until *addr != old. The sleeper count and the value are both
 * seq_cst, so either the waker sees us counted or we see its new value. */
static void wait_change(_Atomic uint32_t *addr, uint32_t old,
                        _Atomic int *sleepers)
{
    for (int i = 0; i < POOL_SPIN; i++) {
        if (atomic_load_explicit(addr, memory_order_acquire) != old)
            return;
        spin_step(i);
    }
    atomic_fetch_add(sleepers, 1);
    while (atomic_load(addr) == old)
        futex_wait(addr, old);
    atomic_fetch_sub(sleepers, 1);
}

static void *worker_main(void *arg)
{
    struct pool_thread *t = arg;
    struct k_pool *p = t->pool;
    uint32_t seen = 0; /* gen starts at 0; a run may precede our first look */
    for (;;) {
        wait_change(&p->gen, seen, &p->sleepers);
        seen = atomic_load_explicit(&p->gen, memory_order_acquire);
        if (atomic_load_explicit(&p->stop, memory_order_relaxed))
            break;
        p->fn(p->ctx, t->ith, p->n);
        if (atomic_fetch_sub(&p->pending, 1) == 1 && atomic_load(&p->waiting))
            futex_wake(&p->pending, 1);
    }
    return NULL;
}

struct k_pool *k_pool_create(int n_threads)
{
    if (n_threads <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = c > 0 ? (int)c : 1;
    }
    if (n_threads > 1024)
        n_threads = 1024;
    struct k_pool *p = aligned_alloc(64, sizeof(*p));
    if (!p)
        return NULL;
    memset(p, 0, sizeof(*p));
    p->n = n_threads;
    p->th = aligned_alloc(64, sizeof(*p->th) * (size_t)n_threads);
    if (!p->th)
        goto fail;
    memset(p->th, 0, sizeof(*p->th) * (size_t)n_threads);
    int started = 1;
    for (int i = 0; i < n_threads; i++) {
        p->th[i].pool = p;
        p->th[i].ith = i;
    }
    for (; started < n_threads; started++)
        if (pthread_create(&p->th[started].tid, NULL, worker_main,
                           &p->th[started]))
            break;
    if (started < n_threads) {
        p->n = started; /* join the ones that did start */
        k_pool_destroy(p);
        return NULL;
    }
    return p;
fail:
    free(p);
    return NULL;
}

void k_pool_destroy(struct k_pool *p)
{
    if (!p)
        return;
    atomic_store(&p->stop, 1);
    atomic_fetch_add(&p->gen, 1);
    futex_wake(&p->gen, INT_MAX);
    for (int i = 1; i < p->n; i++)
        pthread_join(p->th[i].tid, NULL);
    for (int i = 0; i < p->n; i++)
        free(p->th[i].work);
    free(p->th);
    free(p);
}

int k_pool_size(const struct k_pool *p)
{
    return p ? p->n : 1;
}

void k_pool_run(struct k_pool *p, k_pool_fn fn, void *ctx)
{
    if (!p || p->n == 1) {
        fn(ctx, 0, 1);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    atomic_store_explicit(&p->pending, (uint32_t)(p->n - 1),
                          memory_order_relaxed);
    atomic_fetch_add(&p->gen, 1); /* seq_cst: publishes fn, ctx, pending */
    if (atomic_load(&p->sleepers) > 0)
        futex_wake(&p->gen, INT_MAX);
    fn(ctx, 0, p->n);
    /* wait for the workers: spin, then sleep on pending */
    uint32_t v;
    for (int i = 0; i < POOL_SPIN; i++) {
        if (atomic_load_explicit(&p->pending, memory_order_acquire) == 0)
            return;
        spin_step(i);
    }
    atomic_store(&p->waiting, 1);
    while ((v = atomic_load(&p->pending)) != 0)
        futex_wait(&p->pending, v);
    atomic_store(&p->waiting, 0);
}

int kc_pool_reserve(struct k_pool *p, size_t bytes)
{
    bytes = (bytes + 63) & ~(size_t)63;
    for (int i = 0; i < p->n; i++) {
        struct pool_thread *t = &p->th[i];
        if (t->work_size >= bytes)
            continue;
        void *w = aligned_alloc(64, bytes);
        if (!w)
            return -1;
        free(t->work);
        t->work = w;
        t->work_size = bytes;
    }
    return 0;
}

void *kc_pool_work(struct k_pool *p, int ith)
{
    return p->th[ith].work;
}
