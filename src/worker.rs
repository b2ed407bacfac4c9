//! Worker threads: how many a config asks for, and which one the calling thread is. A leaf:
//! per-worker state anywhere (the access-log buffers, the upstream pools' idle lists) is indexed
//! by [`slot`] without reaching up to the server that starts the workers.

use std::cell::Cell;

use crate::config::ServerConfig;

thread_local! {
    /// This thread's worker index; `usize::MAX` on other threads.
    static WORKER: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// How many workers a config asks for: `[server] workers`, else one per core this process may
/// use (`available_parallelism` respects affinity and cgroup quota).
pub fn count(server: &ServerConfig) -> usize {
    server.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    })
}

/// Marks the calling thread as worker `index` (once, when the worker starts).
pub fn become_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// The calling thread's worker index (`usize::MAX` outside the workers).
pub fn slot() -> usize {
    WORKER.with(Cell::get)
}
