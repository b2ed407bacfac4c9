//! A validator's call slots (`max_concurrent`), handed out round-robin by client address: when
//! a slot frees, the next client in turn gets it, not the one with the longest queue. A client
//! flooding the validator with new credentials then waits behind itself, and another client's
//! new credential gets the next free slot (SPEC §11).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::limits::Key;

/// The slots of one validator.
pub struct FairSlots {
    state: Mutex<State>,
}

struct State {
    free: usize,
    /// Each waiting client's queue, oldest first; a queue's sender whose waiter gave up is
    /// skipped when its turn comes.
    waiting: HashMap<Key, VecDeque<oneshot::Sender<()>>>,
    /// Clients with a queue, in turn order.
    turn: VecDeque<Key>,
}

/// A held slot; dropping it hands the slot to the next client in turn.
pub struct Slot<'s> {
    slots: &'s FairSlots,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.slots.release();
    }
}

impl FairSlots {
    /// `max` slots, all free.
    pub fn new(max: usize) -> FairSlots {
        FairSlots {
            state: Mutex::new(State {
                free: max,
                waiting: HashMap::new(),
                turn: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned lock still holds consistent counts.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for `client`, waiting at most `wait` for its turn (`None`: it did not come).
    pub async fn acquire(&self, client: Key, wait: Duration) -> Option<Slot<'_>> {
        let mut rx = {
            let mut state = self.lock();
            if state.free > 0 && state.turn.is_empty() {
                state.free -= 1;
                return Some(Slot { slots: self });
            }
            let (tx, rx) = oneshot::channel();
            let queue = state.waiting.entry(client).or_default();
            if queue.is_empty() {
                state.turn.push_back(client);
            }
            state
                .waiting
                .get_mut(&client)
                .expect("inserted above")
                .push_back(tx);
            rx
        };
        match tokio::time::timeout(wait, &mut rx).await {
            Ok(Ok(())) => Some(Slot { slots: self }),
            _ => {
                // A slot handed over as the wait ran out is ours: pass it on. Under the lock,
                // so that no later hand-over can pick this waiter once it is gone.
                let guard = self.lock();
                let handed = rx.try_recv().is_ok();
                drop(rx);
                drop(guard);
                if handed {
                    self.release();
                }
                None
            }
        }
    }

    /// Gives a slot to the next client in turn that is still waiting, or back to the free ones.
    fn release(&self) {
        let mut state = self.lock();
        while let Some(client) = state.turn.pop_front() {
            let Some(queue) = state.waiting.get_mut(&client) else {
                continue;
            };
            let next = queue.pop_front();
            if queue.is_empty() {
                state.waiting.remove(&client);
            } else {
                state.turn.push_back(client);
            }
            if let Some(tx) = next {
                if tx.send(()).is_ok() {
                    return;
                }
            }
        }
        state.free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_next_client_in_turn() {
        let slots = Arc::new(FairSlots::new(1));
        let held = slots.acquire(1, Duration::from_secs(1)).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Client 1 queues five calls, then client 2 one.
        for (i, client) in [1, 1, 1, 1, 1, 2].into_iter().enumerate() {
            let (task_slots, order) = (Arc::clone(&slots), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let slot = task_slots
                    .acquire(client, Duration::from_secs(5))
                    .await
                    .unwrap();
                order.lock().unwrap().push(client);
                drop(slot);
            }));
            // Queued in this order.
            while slots
                .lock()
                .waiting
                .values()
                .map(VecDeque::len)
                .sum::<usize>()
                <= i
            {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for task in tasks {
            task.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order[..2], [1, 2], "client 2 is served second: {order:?}");
        assert_eq!(slots.lock().free, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_loses_no_slot() {
        let slots = FairSlots::new(1);
        let held = slots.acquire(1, Duration::from_secs(1)).await.unwrap();
        assert!(slots.acquire(2, Duration::from_millis(100)).await.is_none());
        drop(held);
        assert_eq!(slots.lock().free, 1);
        let again = slots.acquire(3, Duration::from_millis(100)).await;
        assert!(again.is_some());
    }
}
