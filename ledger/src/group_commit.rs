//! Group commit: many threads that each need "my transaction is durable" share one
//! flush + fsync instead of paying one each.
//!
//! Data flow: a thread commits its transaction, then takes a ticket (`requested += 1`). If no
//! sync is running it becomes the leader: it notes `target = requested`, releases the lock,
//! calls [`Store::make_durable`] (which covers every transaction committed before the call,
//! hence every ticket up to `target`), then publishes `synced = target` and wakes everyone.
//! A thread whose ticket is ≤ `synced` returns; the others wait, and one of them leads the
//! next sync, which by then covers every ticket taken during the previous one.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::store::{Store, StoreError};

#[derive(Debug, Default)]
struct State {
    /// Tickets handed out.
    requested: u64,
    /// Every ticket up to this one is durable.
    synced: u64,
    /// A leader is syncing now.
    syncing: bool,
    /// A sync failed: nothing more is durable until the ledger is reopened.
    failed: bool,
    /// How many syncs ran (for tests and benchmarks).
    syncs: u64,
}

/// The shared durability barrier of one ledger.
#[derive(Debug, Default)]
pub(crate) struct GroupCommit {
    state: Mutex<State>,
    done: Condvar,
}

impl GroupCommit {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking thread cannot leave `State` half-updated: every update is one assignment
        // sequence under the lock with no call that can panic in between.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns once everything the caller committed before calling is durable.
    pub(crate) fn wait_durable(&self, store: &dyn Store) -> Result<(), StoreError> {
        let mut st = self.lock();
        st.requested += 1;
        let ticket = st.requested;
        loop {
            if st.failed {
                return Err(StoreError::Poisoned);
            }
            if st.synced >= ticket {
                return Ok(());
            }
            if !st.syncing {
                st.syncing = true;
                let target = st.requested;
                drop(st);
                let result = store.make_durable();
                st = self.lock();
                st.syncing = false;
                st.syncs += 1;
                match result {
                    Ok(()) => st.synced = st.synced.max(target),
                    Err(_) => st.failed = true,
                }
                self.done.notify_all();
                result?;
                continue;
            }
            st = self.done.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// How many flush + fsync rounds have run.
    pub(crate) fn syncs(&self) -> u64 {
        self.lock().syncs
    }
}
