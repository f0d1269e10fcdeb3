/// Settings that are valid but defeat the design; printed as warnings by `validate`, `plan`, `apply`.
public struct TopologyWarning: Sendable, Hashable, CustomStringConvertible {
    public var location: SourceLocation?
    public var message: String
    public var description: String { self.location.map { "\($0): warning: \(self.message)" } ?? "warning: \(self.message)" }
}

extension TopologySpec {
    public func checks() -> [TopologyWarning] {
        var warnings: [TopologyWarning] = []
        let limit = self.consumerTimeout
        for queue in self.workQueues where queue.taskTimeout >= limit {
            warnings.append(TopologyWarning(location: queue.origin, message:
                "task_timeout \(queue.taskTimeout) of work queue '\(queue.name)' reaches the broker's consumer_timeout (\(limit)): the broker would close the bridge's channel during an attempt; raise consumer_timeout in rabbitmq.conf or shorten the timeout"))
        }
        // A batch's aggregator never holds a delivery near consumer_timeout (it checkpoints every
        // 10 minutes), so only the queues' expiry bounds how long a batch may wait.
        if self.batchQueueExpiry <= self.batchLifetime {
            warnings.append(TopologyWarning(location: nil, message:
                "fan_in.queue_expires \(self.batchQueueExpiry) is not longer than batch_lifetime \(self.batchLifetime): a batch's queues, and its results, could vanish while no bridge runs"))
        }
        if let expiry = self.deadLetterExpiry, let longest = self.retryTiers.last, longest >= expiry {
            warnings.append(TopologyWarning(location: nil, message:
                "the longest retry tier (\(longest)) is not shorter than dead_letter.expires_after (\(expiry)): dead-lettered tasks would expire before a retry cycle could even be inspected"))
        }
        if let expiry = self.deadLetterExpiry, expiry < .hours(1) {
            warnings.append(TopologyWarning(location: nil, message:
                "dead_letter.expires_after \(expiry) leaves little time to inspect or replay failed tasks"))
        }
        for queue in self.workQueues where queue.deliveryLimit <= queue.retries {
            warnings.append(TopologyWarning(location: queue.origin, message:
                "delivery_limit \(queue.deliveryLimit) of work queue '\(queue.name)' is not above its retries (\(queue.retries)); a few bridge crashes could dead-letter a task that still had retries left"))
        }
        return warnings
    }
}
