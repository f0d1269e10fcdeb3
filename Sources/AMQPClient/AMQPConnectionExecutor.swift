/// A connection's own thread as a `TaskExecutor`: code that prefers it runs on the thread that
/// reads the socket, between the turns of its frame loop.
///
/// A consumer iterated on the connection's executor gets each burst of deliveries without a
/// thread hop (the thread that read them resumes the iterating task itself, at its next turn),
/// and its acks are sent in the same turn. That is what makes a consumer with multiple-acks as
/// fast as one in C; on the default executor every burst wakes a thread of the global pool.
///
/// ```swift
/// let consumer = try await channel.consume("jobs")
/// try await withTaskExecutorPreference(connection.executor) {
///     for try await delivery in consumer {
///         handle(delivery)          // runs on the connection thread: keep it short
///         try delivery.ack()
///     }
/// }
/// ```
///
/// Everything the task does between two suspension points runs on the connection thread, so
/// while it runs no frame is read and no heartbeat is checked: do quick work there (decode, ack,
/// publish and await), and hand anything slow or blocking to another task. A turn that outlasts
/// the connection's stall limit is treated as a stuck thread (the socket is shut down and the
/// connection recovers). After the connection is closed, jobs run on the global concurrent
/// executor, so a task that still prefers this executor keeps running.
public final class AMQPConnectionExecutor: TaskExecutor {
    private let shared: ConnectionShared

    init(shared: ConnectionShared) { self.shared = shared }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let executor = self.asUnownedTaskExecutor()
        let submitted = self.shared.mailbox.submit { _ in job.runSynchronously(on: executor) }
        if !submitted { globalConcurrentExecutor.enqueue(ExecutorJob(job)) }
    }
}
