import AMQPClient
import AQBridge
import AQTestSupport
import Foundation
import Testing

/// Other languages' clients against the bridge: a task published by Python's pika with the
/// documented wire format, and signatures checked with the `standardwebhooks` package.
@Suite(.serialized, .timeLimit(.minutes(2))) struct InteropTests {
    static let root = TestEnvironment.repositoryRoot

    static var python: String {
        ProcessInfo.processInfo.environment["AQ_TEST_PYTHON"].flatMap { $0.isEmpty ? nil : $0 }
            ?? root.appendingPathComponent(".venv/bin/python").path
    }

    @Test func aTaskFromPikaIsDeliveredAndSignedForStandardWebhooks() async throws {
        let secret = "whsec_" + Data((0..<24).map { _ in UInt8.random(in: 0...255) }).base64EncodedString()
        let bridge = try await BridgeHarness.start { $0.signingSecrets = [secret, "whsec_" + Data("an-older-secret-1".utf8).base64EncodedString()] }
        defer { Task { await bridge.stop() } }
        guard FileManager.default.isExecutableFile(atPath: Self.python) else {
            Issue.record("needs Python with pika and standardwebhooks at \(Self.python) (scripts/test installs them)")
            return
        }
        let result = try TestEnvironment.run(URL(fileURLWithPath: Self.python),
                                             [Self.root.appendingPathComponent("Tests/interop/pika_publisher.py").path, bridge.amqpURL, secret])
        let text = result.out + result.err
        #expect(result.status == 0, "\(text)")
        let report = try #require(try JSONSerialization.jsonObject(with: Data((result.out.split(separator: "\n").last ?? "").utf8)) as? [String: Any], "\(text)")
        let seen = try #require(report["seen"] as? [String: [String: Any]])
        let taskId = try #require(report["taskId"] as? String)
        #expect(seen["/cb"]?["verified"] as? Bool == true, "\(seen)")
        #expect(seen["/hook"]?["verified"] as? Bool == true, "\(seen)")
        #expect(seen["/cb"]?["id"] as? String == taskId)
        #expect((seen["/cb"]?["body"] as? [String: Any])?["from"] as? String == "pika")
        let hook = try #require(seen["/hook"]?["body"] as? [String: Any])
        #expect(hook["status"] as? String == "completed")
        #expect(((hook["result"] as? [String: Any])?["echo"] as? [String: Any])?["n"] as? Int == 7)
    }

    @Test func aBatchFromPikaIsAggregatedIntoOneSignedWebhook() async throws {
        let secret = "whsec_" + Data((0..<24).map { _ in UInt8.random(in: 0...255) }).base64EncodedString()
        let bridge = try await BridgeHarness.start { $0.signingSecrets = [secret] }
        defer { Task { await bridge.stop() } }
        guard FileManager.default.isExecutableFile(atPath: Self.python) else {
            Issue.record("needs Python with pika and standardwebhooks at \(Self.python) (scripts/test installs them)")
            return
        }
        let result = try TestEnvironment.run(URL(fileURLWithPath: Self.python),
                                             [Self.root.appendingPathComponent("Tests/interop/pika_batch.py").path, bridge.amqpURL, secret])
        let text = result.out + result.err
        #expect(result.status == 0, "\(text)")
        let line = try #require(try JSONSerialization.jsonObject(with: Data((result.out.split(separator: "\n").last ?? "").utf8)) as? [String: Any], "\(text)")
        let report = try #require(line["report"] as? [String: Any])
        let batchId = try #require(line["batchId"] as? String)
        #expect(report["verified"] as? Bool == true, "\(report)")
        #expect(report["id"] as? String == batchId)
        let body = try #require(report["body"] as? [String: Any])
        #expect(body["status"] as? String == "completed")
        let children = try #require(body["children"] as? [[String: Any]])
        #expect(children.map { ($0["result"] as? [String: Any])?["symbol"] as? String } == ["AAPL", "MSFT", "GOOG", "AMZN"])
    }

    @Test func aChainFromPikaRunsItsStepsInOrder() async throws {
        let bridge = try await BridgeHarness.start()
        defer { Task { await bridge.stop() } }
        guard FileManager.default.isExecutableFile(atPath: Self.python) else {
            Issue.record("needs Python with pika at \(Self.python) (scripts/test installs it)")
            return
        }
        let result = try TestEnvironment.run(URL(fileURLWithPath: Self.python),
                                             [Self.root.appendingPathComponent("Tests/interop/pika_chain.py").path, bridge.amqpURL])
        let text = result.out + result.err
        #expect(result.status == 0, "\(text)")
        let line = try #require(try JSONSerialization.jsonObject(with: Data((result.out.split(separator: "\n").last ?? "").utf8)) as? [String: Any], "\(text)")
        let seen = try #require(line["seen"] as? [String: Any])
        let steps = try #require(seen["steps"] as? [[String: Any]])
        #expect(steps.map { $0["step"] as? Int } == [1, 2])
        let final = try #require(seen["final"] as? [String: Any])
        #expect(final["chainId"] as? String == "py-chain" && (final["result"] as? [String: Any])?["n"] as? Int == 42)
    }
}
