@testable import AMQPClient
import AQTopology
import Foundation
import Testing

/// What `aq dlq` makes of a dead letter, and where a replay sends it (no broker).
@Suite struct DeadLetterTests {
    let spec: TopologySpec = {
        var spec = TopologySpec()
        spec.workQueues = [.init(name: "default"), .init(name: "reports")]
        return spec
    }()

    func letter(_ body: String, headers: AMQPTable, messageId: String? = nil, userId: String? = "bridge") -> AMQPDelivery {
        AMQPDelivery(body: Array(body.utf8), properties: AMQPProperties(contentType: "application/json", headers: headers, messageId: messageId, userId: userId),
                     exchange: "aq.dlx", routingKey: "aq.work.default", deliveryTag: 1, isRedelivered: false, consumerTag: nil, messageCount: nil, acker: nil)
    }

    func publish(_ plan: ReplayPlan) -> (exchange: String, routingKey: String, properties: AMQPProperties)? {
        if case .publish(let exchange, let routingKey, let properties, _) = plan { return (exchange, routingKey, properties) }
        return nil
    }

    @Test func aFailedTaskGoesBackToItsWorkQueueWithAFreshAttemptCount() throws {
        let delivery = self.letter(#"{"callbackUrl":"http://x/cb"}"#, headers: [
            "aq-reason": "retries-exhausted", "aq-queue": "default", "aq-task-id": "t-1", "aq-attempts": .int32(4), "aq-last-status": .int32(503),
            "aq-error": "HTTP 503", "aq-attempt": .int32(4), "retry-tier": "5s", "tenant": "acme", "x-death": .array([]),
        ], messageId: "t-1")
        let letter = DeadLetter(delivery, spec: self.spec, trustedUsers: ["bridge"])
        #expect(letter.kind == .task && letter.taskId == "t-1" && letter.queue == "default" && letter.reason == "retries-exhausted")
        #expect(letter.status == 503 && letter.attempts == 4)
        let plan = try #require(self.publish(ReplayPlan.make(letter, delivery, spec: self.spec)))
        #expect(plan.exchange == "" && plan.routingKey == "aq.work.default")
        #expect(plan.properties.messageId == "t-1" && plan.properties.isPersistent)
        #expect(plan.properties.headers?.keys == ["tenant"], "only the publisher's own headers: attempts start again")
    }

    @Test func aTaskTheBrokerDeadLetteredIsReadFromXDeath() throws {
        let death: AMQPTable = ["reason": "delivery_limit", "queue": "aq.work.reports", "count": .int64(1), "time": .timestamp(1_800_000_000)]
        let delivery = self.letter(#"{"callbackUrl":"http://x/cb"}"#, headers: ["x-death": .array([.table(death)]), "x-first-death-reason": "delivery_limit",
                                                                             "x-first-death-queue": "aq.work.reports"], messageId: "t-2")
        let letter = DeadLetter(delivery, spec: self.spec, trustedUsers: ["bridge"])
        #expect(letter.reason == "delivery_limit" && letter.queue == "reports" && letter.taskId == "t-2")
        #expect(letter.deadLetteredAt == Date(timeIntervalSince1970: 1_800_000_000))
        #expect(self.publish(ReplayPlan.make(letter, delivery, spec: self.spec))?.routingKey == "aq.work.reports")
    }

    @Test func aWebhookGoesBackAsAWebhookJobAndAChainStepResumesItsChain() throws {
        let hook = self.letter(#"{"result":1}"#, headers: [
            "aq-reason": "webhook-failed", "aq-queue": "default", "aq-kind": "webhook", "aq-webhook-url": "http://x/hook", "aq-task-id": "t-3",
            "aq-webhook-id": "t-3:result", "aq-attempt": .int32(5),
        ])
        let webhook = DeadLetter(hook, spec: self.spec, trustedUsers: ["bridge"])
        #expect(webhook.kind == .webhook)
        let headers = try #require(self.publish(ReplayPlan.make(webhook, hook, spec: self.spec))?.properties.headers)
        #expect(headers["aq-kind"]?.stringValue == "webhook" && headers["aq-webhook-url"]?.stringValue == "http://x/hook" && headers["aq-attempt"]?.intValue == 1)

        let stepBody = #"{"chain":{"id":"order-7","queue":"default"},"payload":{},"steps":[{"callbackUrl":"http://x/1"},{"callbackUrl":"http://x/2"}],"step":2,"history":[{}],"results":[{}]}"#
        let step = self.letter(stepBody, headers: ["aq-reason": "not-retryable", "aq-queue": "default", "aq-task-id": "order-7:2"], messageId: "order-7:2")
        let chain = DeadLetter(step, spec: self.spec, trustedUsers: ["bridge"])
        #expect(chain.kind == .chainStep && chain.chainId == "order-7" && chain.chainStep == 2)
        let plan = try #require(self.publish(ReplayPlan.make(chain, step, spec: self.spec)))
        #expect(plan.exchange == "aq.chain" && plan.routingKey == "default.order-7.2" && plan.properties.messageId == "order-7:2")
    }

    @Test func whatWouldFailAgainStaysAndSoDoesABatchChild() throws {
        for reason in ["malformed", "unrouted"] {
            let delivery = self.letter("{}", headers: ["aq-reason": .string(reason), "aq-queue": "default"])
            guard case .skip = ReplayPlan.make(DeadLetter(delivery, spec: self.spec, trustedUsers: ["bridge"]), delivery, spec: self.spec) else {
                Issue.record("\(reason) must stay")
                continue
            }
        }
        let unknownQueue = self.letter("{}", headers: ["aq-reason": "not-retryable", "aq-queue": "gone"])
        guard case .skip = ReplayPlan.make(DeadLetter(unknownQueue, spec: self.spec, trustedUsers: ["bridge"]), unknownQueue, spec: self.spec) else {
            Issue.record("a work queue that is not in the topology")
            return
        }
        let child = self.letter(#"{"callbackUrl":"http://x/cb"}"#, headers: [
            "aq-reason": "retries-exhausted", "aq-queue": "default", "aq-batch": "b-1", "aq-batch-index": .int64(7), "aq-batch-join": "allSettled",
        ])
        let letter = DeadLetter(child, spec: self.spec, trustedUsers: ["bridge"])
        #expect(letter.kind == .batchChild && letter.batchId == "b-1" && letter.batchIndex == 7)
        // Back into its batch (the command checks the batch is open), re-joining it: the batch
        // counted its failure, which its new outcome replaces.
        let headers = try #require(self.publish(ReplayPlan.make(letter, child, spec: self.spec))?.properties.headers)
        #expect(headers["aq-batch"] == "b-1" && headers["aq-batch-index"] == .int64(7) && headers["aq-batch-rejoin"] == .bool(true))
        #expect(headers["aq-reason"] == nil)
        // One the broker dead-lettered (never counted) goes back as the child it was.
        let expired = self.letter(#"{"callbackUrl":"http://x/cb"}"#, headers: [
            "aq-batch": "b-1", "aq-batch-index": .int64(2), "aq-batch-join": "allSettled",
            "x-death": .array([.table(["reason": "delivery_limit", "queue": "aq.work.default"])]),
        ])
        let plain = try #require(self.publish(ReplayPlan.make(DeadLetter(expired, spec: self.spec, trustedUsers: ["bridge"]), expired, spec: self.spec))?.properties.headers)
        #expect(plain["aq-batch-index"] == .int64(2) && plain["aq-batch-rejoin"] == nil)
        // A fail-fast batch ended at the child's failure: nothing to re-join.
        let failFast = self.letter(#"{"callbackUrl":"http://x/cb"}"#, headers: [
            "aq-reason": "not-retryable", "aq-queue": "default", "aq-batch": "b-2", "aq-batch-index": .int64(0), "aq-batch-join": "all",
        ])
        guard case .skip(let why) = ReplayPlan.make(DeadLetter(failFast, spec: self.spec, trustedUsers: ["bridge"]), failFast, spec: self.spec),
              why.contains("fail-fast") else {
            Issue.record("a counted child of a fail-fast batch stays")
            return
        }
        // A chain id the bridge would never make (a publisher's own expired message) cannot be routed.
        let dotted = self.letter(#"{"chain":{"id":"a.b"},"step":1,"steps":[]}"#, headers: [
            "x-death": .array([.table(["reason": "expired", "queue": "aq.work.default"])]),
        ], userId: "someone")
        guard case .skip = ReplayPlan.make(DeadLetter(dotted, spec: self.spec, trustedUsers: ["bridge"]), dotted, spec: self.spec) else {
            Issue.record("a dotted chain id stays")
            return
        }
    }

    @Test func aPublishersOwnAsyncQueueHeadersAreNotBelieved() throws {
        // A message that claims to be a webhook job, expired by the broker: its publisher (not
        // the bridge) wrote those headers; a replay must not turn it into a signed webhook.
        let death: AMQPTable = ["reason": "expired", "queue": "aq.work.default", "count": .int64(1)]
        let delivery = self.letter(#"{"steal":true}"#, headers: [
            "aq-kind": "webhook", "aq-webhook-url": "https://attacker.example/hook", "aq-task-id": "x", "aq-reason": "webhook-failed",
            "x-death": .array([.table(death)]),
        ], userId: "someone")
        let letter = DeadLetter(delivery, spec: self.spec, trustedUsers: ["bridge"])
        #expect(!letter.trusted && letter.kind == .task && letter.reason == "expired" && letter.queue == "default")
        let headers = try #require(self.publish(ReplayPlan.make(letter, delivery, spec: self.spec))?.properties.headers)
        #expect(headers["aq-kind"] == nil && headers["aq-webhook-url"] == nil)
        // x-death lists the most recent death first.
        let twice = self.letter("{}", headers: ["x-death": .array([.table(["reason": "delivery_limit", "queue": "aq.work.reports"]),
                                                                   .table(["reason": "expired", "queue": "aq.retry.5s"])])])
        let latest = DeadLetter(twice, spec: self.spec, trustedUsers: ["bridge"])
        #expect(latest.reason == "delivery_limit" && latest.queue == "reports")
    }

    @Test func filtersTakeReasonsQueuesTaskPrefixesAndTimes() {
        let now = Date(timeIntervalSince1970: 1_800_000_000)
        #expect(DeadLetterFilter.parseSince("2h", now: now) == now.addingTimeInterval(-7200))
        #expect(DeadLetterFilter.parseSince("30m", now: now) == now.addingTimeInterval(-1800))
        #expect(DeadLetterFilter.parseSince("2026-12-01T00:00:00Z") != nil)
        #expect(DeadLetterFilter.parseSince("soon") == nil)
        let delivery = self.letter("{}", headers: ["aq-reason": "not-retryable", "aq-queue": "default", "aq-task-id": "order-7:2",
                                                   "aq-dead-lettered-at": .timestamp(1_800_000_000)])
        let letter = DeadLetter(delivery, spec: self.spec, trustedUsers: ["bridge"])
        #expect(DeadLetterFilter(tasks: ["order-7:*"]).matches(letter))
        #expect(!DeadLetterFilter(tasks: ["order-7"]).matches(letter))
        #expect(DeadLetterFilter(reasons: ["not-retryable"], queues: ["default"]).matches(letter))
        #expect(!DeadLetterFilter(reasons: ["malformed"]).matches(letter))
        #expect(DeadLetterFilter(since: now.addingTimeInterval(-1)).matches(letter))
        #expect(!DeadLetterFilter(since: now.addingTimeInterval(1)).matches(letter))
    }
}
