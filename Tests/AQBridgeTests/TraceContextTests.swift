import AMQPClient
@testable import AQBridge
import AQTestSupport
import Foundation
import Testing

/// W3C trace context: a `traceparent` given with a task reaches its callback and its webhook.
@Suite(.serialized, .timeLimit(.minutes(2))) struct TraceContextTests {
    static let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    static let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    @Test func onlyWellFormedTraceparentsAreTaken() {
        #expect(TaskParser.validTraceparent(Self.trace) == Self.trace)
        for bad in ["", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX: y"] {
            #expect(TaskParser.validTraceparent(bad) == nil, "\(bad)")
        }
    }

    @Test func theCallbackAndTheWebhookGetTheTaskTraceparent() async throws {
        let receiver = try Receiver()
        receiver.on("/cb") { _, _ in .json("{}") }
        receiver.on("/step") { _, _ in .json("{}") }
        let bridge = try await BridgeHarness.start()
        // From the task's field, from the AMQP header, and a malformed one (ignored).
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/cb"))","webhookUrl":"\#(receiver.url("/hook"))","traceparent":"\#(Self.trace)"}"#, id: "field")
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/cb"))","webhookUrl":"\#(receiver.url("/hook"))"}"#, id: "header",
                                 headers: ["traceparent": .string(Self.other)])
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/cb"))","traceparent":"not-a-trace"}"#, id: "bad")
        let calls = try await receiver.wait("/cb", count: 3)
        let hooks = try await receiver.wait("/hook", count: 2)
        func trace(_ recorded: [Receiver.Recorded], _ id: String) -> String? {
            recorded.first { $0.request.header("AsyncQueue-Task-Id") == id }?.request.header("traceparent")
        }
        #expect(trace(calls, "field") == Self.trace && trace(hooks, "field") == Self.trace)
        #expect(trace(calls, "header") == Self.other && trace(hooks, "header") == Self.other)
        #expect(calls.first { $0.request.header("AsyncQueue-Task-Id") == "bad" }?.request.header("traceparent") == nil)
        // A chain created with the header: every step's callback gets it.
        let steps = (0..<3).map { _ in #"{"callbackUrl":"\#(receiver.url("/step"))"}"# }.joined(separator: ",")
        try await bridge.publish(#"{"chain":{"id":"traced"},"payload":{},"steps":[\#(steps)]}"#, headers: ["traceparent": .string(Self.trace)])
        let stepCalls = try await receiver.wait("/step", count: 3)
        #expect(stepCalls.allSatisfy { $0.request.header("traceparent") == Self.trace })
        await bridge.stop()
    }
}
