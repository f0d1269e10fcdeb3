import Synchronization

/// The hand-over from the connection thread to a consuming task.
///
/// Like an unbounded `AsyncThrowingStream` (the broker's prefetch bounds it), but the consumer
/// takes everything buffered under one lock acquisition and then iterates without locking, and
/// the thread adds a whole burst of deliveries at once: one lock round and at most one wake-up per
/// burst instead of per message.
final class DeliveryBuffer: Sendable {
    private struct State {
        /// Optional, so that the consumer can move each one out of its batch (`take()`) instead of
        /// copying it (a copy retains each of its references, and the batch releases them later).
        var items: [AMQPDelivery?] = []
        var waiter: CheckedContinuation<Void, Never>?
        var finished = false
        var failure: AMQPError?
    }

    private let state = Mutex(State())
    /// Called once when the consuming task is cancelled while waiting.
    let onCancel: Mutex<(@Sendable () -> Void)?> = Mutex(nil)

    init() {}

    /// Moves `deliveries` in (thread side), leaving it empty; dropped after `finish`. When the
    /// consumer has taken everything before (the usual case), the arrays are swapped: no delivery
    /// is copied (a copy retains and later releases each of its references), and `deliveries`
    /// gets back the capacity the consumer's last batch left.
    func append(_ deliveries: inout [AMQPDelivery?]) {
        let waiter: CheckedContinuation<Void, Never>? = self.state.withLock { state in
            guard !state.finished else { return nil }
            if state.items.isEmpty {
                swap(&state.items, &deliveries)
            } else {
                state.items.append(contentsOf: deliveries)
            }
            defer { state.waiter = nil }
            return state.waiter
        }
        deliveries.removeAll(keepingCapacity: true)
        waiter?.resume()
    }

    /// Ends the sequence after the buffered deliveries, with an error or normally.
    func finish(throwing error: AMQPError? = nil) {
        let waiter: CheckedContinuation<Void, Never>? = self.state.withLock { state in
            guard !state.finished else { return nil }
            state.finished = true
            state.failure = error
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume()
    }

    var isFinished: Bool { self.state.withLock { $0.finished } }

    /// Moves everything buffered into `batch` (which must be empty); waits if nothing is there.
    /// Returns false at the end of the sequence.
    func take(into batch: inout [AMQPDelivery?]) async throws -> Bool {
        while true {
            enum Step { case got, end(AMQPError?), wait }
            let step: Step = self.state.withLock { state in
                if !state.items.isEmpty {
                    swap(&state.items, &batch)
                    return .got
                }
                if state.finished { return .end(state.failure) }
                return .wait
            }
            switch step {
            case .got: return true
            case .end(let error):
                if let error { throw error }
                return false
            case .wait:
                if Task.isCancelled {
                    self.cancelled()
                    return false
                }
                await withTaskCancellationHandler {
                    await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                        let resumeNow = self.state.withLock { state -> Bool in
                            if !state.items.isEmpty || state.finished { return true }
                            state.waiter = continuation
                            return false
                        }
                        if resumeNow { continuation.resume() }
                    }
                } onCancel: {
                    let waiter = self.state.withLock { state -> CheckedContinuation<Void, Never>? in
                        defer { state.waiter = nil }
                        return state.waiter
                    }
                    waiter?.resume()
                }
            }
        }
    }

    private func cancelled() {
        let handler = self.onCancel.withLock { handler -> (@Sendable () -> Void)? in
            defer { handler = nil }
            return handler
        }
        handler?()
        self.finish()
    }
}
