import Synchronization

/// The broker's answer to one publish, to await later.
///
/// Returned by ``AMQPChannel/beginPublish(_:exchange:routingKey:properties:mandatory:)``, which
/// lets a publisher keep thousands of messages in flight and await their confirms in any order.
public final class AMQPPublishConfirm: Sendable {
    private enum State {
        case pending(CheckedContinuation<AMQPPublishResult, any Error>?)
        case done(Result<AMQPPublishResult, AMQPError>)
    }

    private let state = Mutex(State.pending(nil))

    init() {}

    func complete(_ result: Result<AMQPPublishResult, AMQPError>) {
        let waiter: CheckedContinuation<AMQPPublishResult, any Error>? = self.state.withLock { state in
            guard case .pending(let waiter) = state else { return nil }
            state = .done(result)
            return waiter
        }
        waiter?.resume(with: result.mapError { $0 })
    }

    /// True once the broker answered (or the channel was lost).
    public var isResolved: Bool {
        self.state.withLock { if case .done = $0 { return true } else { return false } }
    }

    /// Waits for the broker's confirm.
    ///
    /// - Returns: `.confirmed`, `.returned` (unroutable `mandatory` publish) or `.sent` (no confirms).
    /// - Throws: ``AMQPError`` with code `publishNacked`, or with ``AMQPError/isOutcomeUnknown``
    ///   when the channel or connection closed first. Call it once.
    public func result() async throws -> AMQPPublishResult {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<AMQPPublishResult, any Error>) in
            let done: Result<AMQPPublishResult, AMQPError>? = self.state.withLock { state in
                switch state {
                case .done(let result): return result
                case .pending:
                    state = .pending(continuation)
                    return nil
                }
            }
            if let done { continuation.resume(with: done.mapError { $0 }) }
        }
    }
}
