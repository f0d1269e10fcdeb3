import AMQPClient
import Foundation

/// A lifecycle event (issue 11): a small JSON body on the events exchange, routing key
/// `<event>.<work queue>`, for dashboards and `aq events tail`. Telemetry, not state: published
/// without a confirm on a channel of its own, so an event can be lost (a broker restart), never
/// a task.
enum LifecycleEvent: String {
    case taskReceived = "task.received"
    case taskCompleted = "task.completed"
    case taskRetried = "task.retried"
    case taskFailed = "task.failed"
    case taskDeadLettered = "task.dead-lettered"
    case webhookDelivered = "webhook.delivered"
    case webhookGivenUp = "webhook.given-up"
    /// Outcomes were folded into a batch (at most every 200 ms per batch): its counts so far.
    case batchProgress = "batch.progress"
    case batchEnded = "batch.ended"
    case chainStepCompleted = "chain.step-completed"
    case chainCompleted = "chain.completed"
    case chainFailed = "chain.failed"

    /// Published with `events: failures` (and `all`): what went wrong or ended.
    var isFailureLevel: Bool {
        switch self {
        case .taskReceived, .taskCompleted, .webhookDelivered, .batchProgress, .chainStepCompleted: return false
        default: return true
        }
    }
}

extension BridgeEngine {
    /// Opens the events channel when events are on and the exchange exists (else says so once).
    func startEvents() {
        guard self.settings.events != .off else { return }
        do throws(AMQPError) {
            let channel = try self.context.openChannel()
            guard try self.context.exchangeExists(channel: channel, name: self.settings.spec.eventsExchange) else {
                self.logger.warning("lifecycle events are on but their exchange does not exist; run `aq topology apply`",
                                    metadata: ["exchange": "\(self.settings.spec.eventsExchange)"])
                return
            }
            self.eventsChannel = channel
        } catch {
            self.logger.warning("lifecycle events are off: \(error)")
        }
    }

    /// Publishes `event` if the settings ask for it. `fields` is more of the body, each
    /// `,"key":value` already JSON.
    /// `fields` is built only when the event goes out (most events on the happy path do not).
    func emit(_ event: LifecycleEvent, queue: String, taskId: String?, attempt: Int? = nil, run: Run? = nil, fields: @autoclosure () -> String = "") {
        guard let channel = self.eventsChannel, self.settings.events == .all || event.isFailureLevel else { return }
        var body = "{\"event\":\"\(event.rawValue)\",\"at\":\(Self.unixMilliseconds()),\"queue\":\(JSONScan.quote(queue))"
        if let taskId { body += ",\"taskId\":\(JSONScan.quote(taskId))" }
        if let attempt { body += ",\"attempt\":\(attempt)" }
        if let run {
            let elapsed = ContinuousClock.now - run.began
            body += ",\"durationMs\":\(elapsed.components.seconds * 1000 + elapsed.components.attoseconds / 1_000_000_000_000_000)"
            if let traceparent = run.traceparent { body += ",\"traceparent\":\"\(traceparent)\"" }
        }
        body += fields()
        body += "}"
        self.context.publish(channel: channel, exchange: self.settings.spec.eventsExchange, routingKey: "\(event.rawValue).\(queue)",
                             properties: AMQPProperties(contentType: "application/json", deliveryMode: .transient, type: event.rawValue,
                                                         userId: self.settings.bridgeUser),
                             body: Array(body.utf8), mandatory: false) { _ in }
    }
}
