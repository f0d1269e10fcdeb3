import Synchronization

/// Counters for `/metrics` (Prometheus text format). Bounded labels only: no URLs, no ids.
public final class BridgeMetrics: Sendable {
    public enum Counter: String, CaseIterable, Sendable {
        case tasksReceived = "aq_bridge_tasks_received_total"
        case tasksCompleted = "aq_bridge_tasks_completed_total"
        case tasksRetried = "aq_bridge_tasks_retried_total"
        case tasksFailed = "aq_bridge_tasks_failed_total"
        case tasksMalformed = "aq_bridge_tasks_malformed_total"
        case tasksRequeued = "aq_bridge_tasks_requeued_total"
        case callbacks2xx = "aq_bridge_callbacks_2xx_total"
        case callbacksFailed = "aq_bridge_callbacks_failed_total"
        case webhooksDelivered = "aq_bridge_webhooks_delivered_total"
        case webhooksRetried = "aq_bridge_webhooks_retried_total"
        case webhooksFailed = "aq_bridge_webhooks_failed_total"
        case deadLettered = "aq_bridge_dead_lettered_total"
        case tasksParked = "aq_bridge_tasks_parked_total"
        case tasksUnreadable = "aq_bridge_tasks_unreadable_total"
        case tasksDelayed = "aq_bridge_tasks_delayed_total"
        case tasksUnrouted = "aq_bridge_tasks_unrouted_total"
        case repliesPublished = "aq_bridge_replies_published_total"
        case repliesFailed = "aq_bridge_replies_failed_total"
        case batchesCreated = "aq_bridge_batches_created_total"
        case batchesEnded = "aq_bridge_batches_ended_total"
        case batchOutcomes = "aq_bridge_batch_child_outcomes_total"
        case batchChildrenSkipped = "aq_bridge_batch_children_skipped_total"
        case chainsCreated = "aq_bridge_chains_created_total"
        case chainsCompleted = "aq_bridge_chains_completed_total"
        case chainsFailed = "aq_bridge_chains_failed_total"

        var index: Int {
            switch self {
            case .tasksReceived: return 0
            case .tasksCompleted: return 1
            case .tasksRetried: return 2
            case .tasksFailed: return 3
            case .tasksMalformed: return 4
            case .tasksRequeued: return 5
            case .callbacks2xx: return 6
            case .callbacksFailed: return 7
            case .webhooksDelivered: return 8
            case .webhooksRetried: return 9
            case .webhooksFailed: return 10
            case .deadLettered: return 11
            case .tasksParked: return 12
            case .tasksUnreadable: return 13
            case .tasksDelayed: return 14
            case .tasksUnrouted: return 15
            case .repliesPublished: return 16
            case .repliesFailed: return 17
            case .batchesCreated: return 18
            case .batchesEnded: return 19
            case .batchOutcomes: return 20
            case .batchChildrenSkipped: return 21
            case .chainsCreated: return 22
            case .chainsCompleted: return 23
            case .chainsFailed: return 24
            }
        }

        var help: String {
            switch self {
            case .tasksReceived: return "Task deliveries taken from work queues."
            case .tasksCompleted: return "Tasks whose callback answered 2xx (and whose webhook, if any, was delivered or scheduled)."
            case .tasksRetried: return "Failed attempts sent to a retry tier."
            case .tasksFailed: return "Tasks that failed for good (retries spent or not retryable)."
            case .tasksMalformed: return "Messages that were not valid tasks, dead-lettered with the reason."
            case .tasksRequeued: return "Deliveries handed back to the broker (shutdown, or a publish that failed)."
            case .callbacks2xx: return "Callback requests answered 2xx."
            case .callbacksFailed: return "Callback requests that failed (non-2xx or no answer)."
            case .webhooksDelivered: return "Webhook requests answered 2xx."
            case .webhooksRetried: return "Webhook deliveries sent to a retry tier."
            case .webhooksFailed: return "Webhooks given up on and dead-lettered."
            case .deadLettered: return "Messages published to the dead-letter exchange."
            case .tasksParked: return "Tasks sent back to wait in the broker (their host had a long line, or the bridge held too many bytes)."
            case .tasksUnreadable: return "Deliveries rejected unread to the dead-letter queue (over max_payload_bytes, or headers over the client's limits)."
            case .tasksDelayed: return "Hops of delayed tasks through the retry tiers until they are due."
            case .tasksUnrouted: return "Tasks whose routing key named no work queue, dead-lettered."
            case .repliesPublished: return "Outcomes published to a task's reply_to queue."
            case .repliesFailed: return "Outcomes whose reply_to queue did not take them, dead-lettered."
            case .batchesCreated: return "Batches created (their opening message read and their children published)."
            case .batchesEnded: return "Batches this bridge ended (completed, failed or expired) and reported."
            case .batchOutcomes: return "Final outcomes of batch children published to their batch."
            case .batchChildrenSkipped: return "Children of a fail-fast batch not run because their batch had already ended."
            case .chainsCreated: return "Chains created (their first step published)."
            case .chainsCompleted: return "Chains whose last step succeeded."
            case .chainsFailed: return "Chains ended by a step that failed for good."
            }
        }
    }

    private let values = Mutex<[Int]>(Array(repeating: 0, count: Counter.allCases.count))
    public let inFlight = Atomic<Int>(0)
    public let inFlightBytes = Atomic<Int>(0)
    public let peakInFlightBytes = Atomic<Int>(0)
    public let waitingRequests = Atomic<Int>(0)
    public let connected = Atomic<Bool>(false)
    public let consuming = Atomic<Bool>(false)

    public init() {}

    public func add(_ counter: Counter, _ n: Int = 1) {
        let i = counter.index
        self.values.withLock { $0[i] += n }
    }

    /// Adds counts gathered elsewhere (the bridge's thread batches them: one lock per loop turn).
    func merge(_ deltas: inout [Int]) {
        self.values.withLock { values in
            for i in deltas.indices where deltas[i] != 0 { values[i] += deltas[i] }
        }
        for i in deltas.indices { deltas[i] = 0 }
    }

    public func value(_ counter: Counter) -> Int {
        let i = counter.index
        return self.values.withLock { $0[i] }
    }

    public func prometheus() -> String {
        var out = ""
        for counter in Counter.allCases {
            out += "# HELP \(counter.rawValue) \(counter.help)\n# TYPE \(counter.rawValue) counter\n\(counter.rawValue) \(self.value(counter))\n"
        }
        out += "# HELP aq_bridge_tasks_in_flight Deliveries being worked on.\n# TYPE aq_bridge_tasks_in_flight gauge\naq_bridge_tasks_in_flight \(self.inFlight.load(ordering: .relaxed))\n"
        out += "# HELP aq_bridge_inflight_bytes Bytes of tasks and results held in memory.\n# TYPE aq_bridge_inflight_bytes gauge\naq_bridge_inflight_bytes \(self.inFlightBytes.load(ordering: .relaxed))\n"
        out += "# HELP aq_bridge_inflight_bytes_peak The most bytes of tasks and results held at once since start.\n# TYPE aq_bridge_inflight_bytes_peak gauge\naq_bridge_inflight_bytes_peak \(self.peakInFlightBytes.load(ordering: .relaxed))\n"
        out += "# HELP aq_bridge_requests_waiting HTTP requests waiting for a slot of their queue or host.\n# TYPE aq_bridge_requests_waiting gauge\naq_bridge_requests_waiting \(self.waitingRequests.load(ordering: .relaxed))\n"
        out += "# HELP aq_bridge_amqp_connected 1 while connected to the broker.\n# TYPE aq_bridge_amqp_connected gauge\naq_bridge_amqp_connected \(self.connected.load(ordering: .relaxed) ? 1 : 0)\n"
        return out
    }
}
