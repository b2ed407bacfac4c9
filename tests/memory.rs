//! What a cached credential costs in memory: the live heap bytes the validation cache holds
//! per entry at a million entries, counted by a global allocator that tallies every
//! allocation of this test process (SPEC §2's cache with `max_entries = 1000000`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokengate::cache::Cache;
use tokengate::config::CacheConfig;
use tokengate::validate::{Identity, ValidatedBy, Verdict};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const ENTRIES: usize = 1_000_000;
/// The bound of the connection-layer issue: at most this many bytes per cached credential.
const MAX_BYTES_PER_ENTRY: isize = 200;

/// Fills a cache with `ENTRIES` validated credentials whose identities `identity(i)` makes,
/// and returns the live bytes per entry it holds.
fn bytes_per_entry(identity: impl Fn(usize) -> Identity) -> isize {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let cache = Cache::new(&CacheConfig {
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(10),
            max_entries: ENTRIES + 1,
        });
        let before = LIVE.load(Ordering::Relaxed);
        let rss_before = rss_kib();
        for i in 0..ENTRIES {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_le_bytes());
            key[8] = 0x5a;
            let verdict = Verdict::Allowed(Arc::new(identity(i)));
            let (outcome, _) = cache
                .get_or_validate(key, || async move { Ok(verdict) })
                .await;
            assert!(outcome.is_ok());
        }
        // Let the finished validation tasks be dropped.
        tokio::task::yield_now().await;
        assert_eq!(cache.len(), ENTRIES);
        let per_entry = (LIVE.load(Ordering::Relaxed) - before) / ENTRIES as isize;
        // What the process grew by, malloc's own overhead included (for the record).
        println!(
            "resident memory grew by {} bytes per entry",
            (rss_kib() - rss_before) * 1024 / ENTRIES as isize
        );
        drop(cache);
        per_entry
    })
}

/// This process's resident memory, KiB.
fn rss_kib() -> isize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// An issued token of one of a few users: per-token id and expiry, the user shared.
#[test]
fn a_cached_credential_costs_at_most_200_bytes() {
    let principals: Vec<_> = (0..16)
        .map(|u| {
            tokengate::validate::principal(&format!("user-{u}"), &format!("account-{u}"), None)
        })
        .collect();
    let per_entry = bytes_per_entry(|i| Identity {
        principal: Arc::clone(&principals[i % principals.len()]),
        token_id: Some(format!("{i:016}").into()),
        validator: ValidatedBy::Store,
        expires: Some(SystemTime::now() + Duration::from_secs(86_400)),
        usage: None,
        facts: None,
    });
    println!("{per_entry} bytes per cached issued token ({ENTRIES} entries)");
    assert!(
        per_entry <= MAX_BYTES_PER_ENTRY,
        "{per_entry} bytes per cached credential"
    );
}
