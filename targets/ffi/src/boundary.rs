//! The boundary: the library's own tokio runtime, and the guards that turn
//! a panic into [`FedgeError::Internal`] instead of unwinding into (or
//! aborting) the host.
//!
//! **Threading model.** Every exported call that can take long (loading a
//! model compiles it, inference, training, encoding an update, running
//! rounds) is an `async` function whose body only hands the work to this
//! runtime (`spawn_blocking` for CPU work, `spawn` for the QUIC device
//! loop) and awaits the handle. The foreign executor (Kotlin coroutines,
//! Swift concurrency, Python asyncio) polls that future on its own thread;
//! polling never runs model code, so a UI thread is never blocked. The
//! runtime wakes the foreign executor when the work is done. Dropping
//! (cancelling) the foreign future aborts a device loop; CPU work already
//! started runs to its end on the runtime's thread and its result is
//! dropped.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use crate::FedgeError;

/// Worker threads for async work (the QUIC device loop). CPU work runs on
/// the blocking pool, which grows up to [`BLOCKING_THREADS_MAX`].
const WORKER_THREADS: usize = 2;
const BLOCKING_THREADS_MAX: usize = 8;

/// The library's tokio runtime, created on first use and kept for the life
/// of the process.
pub(crate) fn runtime() -> Result<&'static tokio::runtime::Runtime, FedgeError> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(WORKER_THREADS)
                .max_blocking_threads(BLOCKING_THREADS_MAX)
                .thread_name("fedge-ffi")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the library's runtime: {e}"))
        })
        .as_ref()
        .map_err(|e| FedgeError::Internal { detail: e.clone() })
}

/// The message of a caught panic.
pub(crate) fn panic_error(payload: Box<dyn Any + Send>) -> FedgeError {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".into());
    FedgeError::Internal {
        detail: format!("panic: {msg}"),
    }
}

/// Run `f`, turning a panic into [`FedgeError::Internal`]. Every exported
/// synchronous function goes through this.
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T, FedgeError>) -> Result<T, FedgeError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(panic_error(p)))
}

/// Run the CPU-bound `f` on the runtime's blocking pool, guarded.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FedgeError> + Send + 'static,
) -> Result<T, FedgeError> {
    let handle = runtime()?.spawn_blocking(move || guard(f));
    match handle.await {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err(panic_error(e.into_panic())),
        Err(e) => Err(FedgeError::Internal {
            detail: format!("background work did not finish: {e}"),
        }),
    }
}

/// Run the future `f` as a task on the runtime, guarded. The task is
/// aborted when the returned future is dropped (the host cancelled).
pub(crate) async fn spawn<T: Send + 'static>(
    f: impl Future<Output = Result<T, FedgeError>> + Send + 'static,
) -> Result<T, FedgeError> {
    let handle = AbortOnDrop(runtime()?.spawn(CatchUnwind(Box::pin(f))));
    match handle.await {
        Ok(r) => r,
        Err(e) => Err(FedgeError::Internal {
            detail: format!("background task did not finish: {e}"),
        }),
    }
}

/// Guard an exported async function: a panic while it is polled becomes
/// [`FedgeError::Internal`].
pub(crate) async fn guard_async<T>(
    f: impl Future<Output = Result<T, FedgeError>>,
) -> Result<T, FedgeError> {
    CatchUnwind(Box::pin(f)).await
}

/// A future that catches a panic in its inner future's `poll`.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<T, F: Future<Output = Result<T, FedgeError>>> Future for CatchUnwind<F> {
    type Output = Result<T, FedgeError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        catch_unwind(AssertUnwindSafe(|| inner.poll(cx)))
            .unwrap_or_else(|p| Poll::Ready(Err(panic_error(p))))
    }
}

/// A task handle that aborts its task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boom() -> Result<u32, FedgeError> {
        panic!("boom")
    }

    #[test]
    fn panics_become_internal_errors_on_every_path() {
        let want = Err(FedgeError::Internal {
            detail: "panic: boom".into(),
        });
        assert_eq!(guard(boom), want);
        assert_eq!(guard(|| Ok(7)), Ok(7));
        let rt = runtime().unwrap();
        assert_eq!(rt.block_on(blocking(boom)), want);
        assert_eq!(rt.block_on(blocking(|| Ok(8))), Ok(8));
        assert_eq!(rt.block_on(spawn(async { boom() })), want);
        assert_eq!(rt.block_on(guard_async(async { boom() })), want);
        let formatted = guard(|| -> Result<(), FedgeError> { panic!("{} and {}", 1, 2) });
        assert_eq!(
            formatted,
            Err(FedgeError::Internal {
                detail: "panic: 1 and 2".into()
            })
        );
    }
}
