import AMQPClient
import Foundation
import Logging
import Synchronization

/// What the gateway knows from the bridges' lifecycle events (`aq.events`): batches and chains
/// in progress, recent tasks and failures, and a count per minute for the last hour. Telemetry
/// for the dashboard and the progress endpoints, held in memory and bounded; the broker holds the
/// state that matters. Progress needs the bridges' `events: all`; with `failures` (their
/// default) only ends and failures arrive.
final class EventMonitor: Sendable {
    struct BatchView: Sendable {
        var id: String
        var queue: String
        var size: Int
        var settled: Int
        var failed: Int
        var status: String
        var at: Int64
    }

    struct ChainView: Sendable {
        var id: String
        var queue: String
        /// The last step completed (0: none yet).
        var step: Int
        var steps: Int?
        var status: String
        var failedStep: Int?
        var at: Int64
    }

    struct TaskView: Sendable {
        var id: String
        var queue: String
        var status: String
        var attempt: Int
        var detail: String
        var at: Int64
    }

    struct Minute: Sendable {
        var minute: Int64
        var completed = 0
        var failed = 0
    }

    private struct State {
        var batches: [String: BatchView] = [:]
        var chains: [String: ChainView] = [:]
        var tasks: [String: TaskView] = [:]
        var taskOrder: [String] = []
        var failures: [TaskView] = []
        var minutes: [Minute] = []
        var received = 0
    }

    static let keep = 200, keepBatches = 1000

    private let state = Mutex(State())

    /// Folds one event body in.
    func take(_ body: [UInt8]) {
        guard let event = (try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any],
              let name = event["event"] as? String else { return }
        let at = (event["at"] as? NSNumber)?.int64Value ?? Int64(Date().timeIntervalSince1970 * 1000)
        // Kept short: an event is telemetry, and its strings end up in a page.
        func text(_ key: String) -> String? { (event[key] as? String).map { String($0.prefix(300)) } }
        let queue = text("queue") ?? "-"
        let taskId = text("taskId") ?? "-"
        let attempt = (event["attempt"] as? NSNumber)?.intValue ?? 1
        func int(_ key: String) -> Int? { (event[key] as? NSNumber)?.intValue }
        self.state.withLock { state in
            state.received += 1
            func count(completed: Bool) {
                let minute = at / 60_000
                if state.minutes.last?.minute != minute { state.minutes.append(Minute(minute: minute)) }
                if completed { state.minutes[state.minutes.count - 1].completed += 1 } else { state.minutes[state.minutes.count - 1].failed += 1 }
                if state.minutes.count > 60 { state.minutes.removeFirst(state.minutes.count - 60) }
            }
            func task(_ status: String, detail: String = "") {
                if state.tasks[taskId] == nil {
                    state.taskOrder.append(taskId)
                    if state.taskOrder.count > Self.keep { state.tasks[state.taskOrder.removeFirst()] = nil }
                }
                state.tasks[taskId] = TaskView(id: taskId, queue: queue, status: status, attempt: attempt, detail: detail, at: at)
            }
            func failure(_ kind: String) {
                let reason = text("reason") ?? kind
                let error = text("error") ?? ""
                state.failures.append(TaskView(id: taskId, queue: queue, status: kind, attempt: attempt, detail: error.isEmpty ? reason : "\(reason): \(error)", at: at))
                if state.failures.count > Self.keep { state.failures.removeFirst() }
            }
            switch name {
            case "task.received": task("running")
            case "task.completed":
                task("completed", detail: int("durationMs").map { "\($0) ms" } ?? "")
                count(completed: true)
            case "task.retried": task("retrying", detail: "\(text("reason") ?? "") (in \(int("delayMs") ?? 0) ms)")
            case "task.failed":
                task("failed", detail: text("reason") ?? "")
                count(completed: false)
                failure("failed")
            case "task.dead-lettered": failure("dead-lettered")
            case "webhook.given-up": failure("webhook given up")
            case "batch.progress", "batch.ended":
                let id = text("batchId") ?? taskId
                if state.batches[id] == nil, state.batches.count >= Self.keepBatches,
                   let oldest = state.batches.values.min(by: { $0.at < $1.at }) { state.batches[oldest.id] = nil }
                state.batches[id] = BatchView(id: id, queue: queue, size: int("size") ?? 0, settled: int("settled") ?? 0, failed: int("failed") ?? 0,
                                              status: name == "batch.ended" ? (text("status") ?? "ended") : "running", at: at)
            case "chain.step-completed", "chain.completed", "chain.failed":
                let id = text("chainId") ?? taskId
                var view = state.chains[id] ?? ChainView(id: id, queue: queue, step: 0, steps: nil, status: "running", failedStep: nil, at: at)
                if state.chains[id] == nil, state.chains.count >= Self.keepBatches,
                   let oldest = state.chains.values.min(by: { $0.at < $1.at }) { state.chains[oldest.id] = nil }
                view.at = at
                switch name {
                case "chain.step-completed": view.step = max(view.step, int("step") ?? 0)
                case "chain.completed":
                    view.status = "completed"
                    view.steps = int("steps")
                    view.step = view.steps ?? view.step
                default:
                    view.status = "failed"
                    view.failedStep = int("failedStep")
                    failure("chain failed")
                }
                state.chains[id] = view
            default: break
            }
        }
    }

    func batch(_ id: String) -> BatchView? { self.state.withLock { $0.batches[id] } }
    func chain(_ id: String) -> ChainView? { self.state.withLock { $0.chains[id] } }

    struct Snapshot: Sendable {
        var batches: [BatchView]
        var chains: [ChainView]
        var tasks: [TaskView]
        var failures: [TaskView]
        var minutes: [Minute]
        var received: Int
    }

    func snapshot() -> Snapshot {
        self.state.withLock { state in
            Snapshot(batches: state.batches.values.sorted { $0.at > $1.at }, chains: state.chains.values.sorted { $0.at > $1.at },
                     tasks: state.taskOrder.reversed().compactMap { state.tasks[$0] }, failures: state.failures.reversed(),
                     minutes: state.minutes, received: state.received)
        }
    }

    /// Consumes the events exchange through a queue of its own until cancelled; starts again
    /// when the connection comes back.
    /// Only events a trusted user published count (the broker vouches for `user_id`; the bridge
    /// stamps its own): anyone allowed to publish to the exchange cannot fake a batch's end.
    func run(connection: @escaping @Sendable () -> AMQPConnection?, exchange: String, trusted: Set<String>, logger: Logger) async {
        while !Task.isCancelled {
            guard let connection = connection(), connection.isConnected else {
                try? await Task.sleep(for: .seconds(1))
                continue
            }
            do {
                let channel = try await connection.openChannel()
                do {
                    try await channel.declareExchange(exchange, type: .topic, passive: true)
                } catch {
                    logger.warning("the events exchange does not exist: no live dashboard data (run `aq topology apply`)", metadata: ["exchange": "\(exchange)"])
                    try? await channel.close()
                    try? await Task.sleep(for: .seconds(30))
                    continue
                }
                let queue = try await channel.declareQueue("", durable: false, exclusive: true, autoDelete: true,
                                                           arguments: ["x-max-length": .int32(10_000), "x-overflow": "drop-head"])
                try await channel.bindQueue(queue.name, to: exchange, routingKey: "#")
                // Acknowledged, with a prefetch: the broker holds what this process has not read yet
                // (up to the queue's 10,000, oldest dropped), never this process's memory.
                try await channel.setPrefetch(256)
                var unacked = 0
                for try await delivery in try await channel.consume(queue.name, exclusive: true, maxBodyBytes: 64 << 10) {
                    if let user = delivery.properties.userId, trusted.contains(user) { self.take(delivery.body) }
                    unacked += 1
                    if unacked >= 64 {
                        try delivery.ack(multiple: true)
                        unacked = 0
                    }
                }
            } catch {
                logger.debug("events consumer ended", metadata: ["error": "\(error)"])
            }
            try? await Task.sleep(for: .seconds(1))
        }
    }
}
