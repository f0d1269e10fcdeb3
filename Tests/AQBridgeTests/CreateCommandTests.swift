import AMQPClient
@testable import AQBridge
import AQTestSupport
import Foundation
import Testing

/// `aq tasks|batches|chains create` as a script runs them (the built binary), with a bridge.
@Suite(.serialized, .timeLimit(.minutes(3))) struct CreateCommandTests {
    func aq(_ bridge: BridgeHarness, _ arguments: [String]) throws -> (status: Int32, out: String, err: String) {
        try TestEnvironment.run(TestEnvironment.builtProgram("aq"), arguments + ["--url", bridge.amqpURL, "-f", bridge.topologyDir.path])
    }

    @Test func aTaskFromTheShellRunsAndWaitPrintsItsOutcome() async throws {
        let receiver = try Receiver()
        receiver.on("/double") { request, _ in .json(#"{"doubled":\#((request.json?["n"] as? Int ?? 0) * 2)}"#) }
        receiver.on("/refuse") { _, _ in .text("no", status: 422) }
        let bridge = try await BridgeHarness.start()
        // Fire and forget: the id printed is the task's.
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("payload-\(UUID().uuidString).json")
        try #"{"n":21}"#.write(to: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: file) }
        let created = try self.aq(bridge, ["tasks", "create", "--callback-url", receiver.url("/double"), "--payload-file", file.path])
        #expect(created.status == 0, "\(created.err)")
        let id = created.out.trimmingCharacters(in: .whitespacesAndNewlines)
        let calls = try await receiver.wait("/double", count: 1)
        #expect(calls[0].request.header("AsyncQueue-Task-Id") == id && !id.isEmpty)
        #expect(calls[0].request.json?["n"] as? Int == 21)
        // The payload from standard input, as a pipe in a script gives it.
        let piped = try TestEnvironment.run(TestEnvironment.builtProgram("aq"), ["tasks", "create", "--callback-url", receiver.url("/double"), "--payload-file", "-",
                                                                                 "--id", "stdin-1", "--url", bridge.amqpURL, "-f", bridge.topologyDir.path],
                                            input: #"{"n":4}"# + "\n")
        #expect(piped.status == 0 && piped.out.trimmingCharacters(in: .whitespacesAndNewlines) == "stdin-1", "\(piped.out)\(piped.err)")
        let fromPipe = try await receiver.wait("/double", count: 2)
        #expect(fromPipe[1].request.header("AsyncQueue-Task-Id") == "stdin-1" && fromPipe[1].request.json?["n"] as? Int == 4)
        // --wait: the outcome through a reply queue; the exit status says how it went.
        let waited = try self.aq(bridge, ["tasks", "create", "--callback-url", receiver.url("/double"), "--payload", #"{"n":5}"#, "--id", "w-1", "--wait"])
        #expect(waited.status == 0, "\(waited.err)")
        let outcome = try #require(try JSONSerialization.jsonObject(with: Data(waited.out.utf8)) as? [String: Any])
        #expect(outcome["taskId"] as? String == "w-1" && outcome["status"] as? String == "completed")
        #expect((outcome["result"] as? [String: Any])?["doubled"] as? Int == 10)
        let failed = try self.aq(bridge, ["tasks", "create", "--callback-url", receiver.url("/refuse"), "--retries", "0", "--wait"])
        #expect(failed.status == 1 && failed.out.contains("\"not-retryable\""), "\(failed.out)\(failed.err)")
        // A work queue that does not exist is refused before anything is published.
        let unknown = try self.aq(bridge, ["tasks", "create", "--callback-url", receiver.url("/double"), "--queue", "nope"])
        #expect(unknown.status == 1 && unknown.err.contains("'nope' is not a work queue"))
        await bridge.stop()
    }

    @Test func batchesAndChainsFromTheShell() async throws {
        let receiver = try Receiver()
        receiver.on("/step") { _, _ in .json(#"{"ok":true}"#) }
        receiver.on("/no") { _, _ in .text("no", status: 422) }
        let bridge = try await BridgeHarness.start()
        let chain = try self.aq(bridge, ["chains", "create", "--json",
                                         #"{"chain":{"id":"cli-chain","webhookUrl":"\#(receiver.url("/chain-done"))"},"payload":{},"steps":[{"callbackUrl":"\#(receiver.url("/step"))"},{"callbackUrl":"\#(receiver.url("/step"))"}]}"#])
        #expect(chain.status == 0 && chain.out.trimmingCharacters(in: .whitespacesAndNewlines) == "cli-chain", "\(chain.err)")
        #expect(try await receiver.wait("/chain-done", count: 1)[0].request.json?["status"] as? String == "completed")
        let children = (0..<3).map { #"{"callbackUrl":"\#(receiver.url("/step"))","payload":{"i":\#($0)}}"# }.joined(separator: ",")
        let batch = try self.aq(bridge, ["batches", "create", "--id", "cli-batch", "--json",
                                         #"{"batch":{"webhookUrl":"\#(receiver.url("/batch-done"))"},"tasks":[\#(children)]}"#])
        #expect(batch.status == 0 && batch.out.trimmingCharacters(in: .whitespacesAndNewlines) == "cli-batch", "\(batch.err)")
        let report = try await receiver.wait("/batch-done", count: 1)[0].request.json
        #expect(report?["batchId"] as? String == "cli-batch" && (report?["counts"] as? [String: Any])?["completed"] as? Int == 3, "\(String(describing: report))")
        // --wait: the end, through the lifecycle events.
        let waited = try self.aq(bridge, ["chains", "create", "--wait", "--json",
                                          #"{"chain":{"id":"cli-wait"},"payload":{},"steps":[{"callbackUrl":"\#(receiver.url("/step"))"}]}"#])
        #expect(waited.status == 0 && waited.out.contains("\"chain.completed\"") && waited.out.contains("\"cli-wait\""), "\(waited.out)\(waited.err)")
        let failing = try self.aq(bridge, ["batches", "create", "--wait", "--id", "cli-fail", "--json",
                                           #"{"batch":{"join":"all"},"tasks":[{"callbackUrl":"\#(receiver.url("/no"))","retries":0}]}"#])
        #expect(failing.status == 1 && failing.out.contains("\"batch.ended\"") && failing.out.contains("\"failed\""), "\(failing.out)\(failing.err)")
        let task = try self.aq(bridge, ["batches", "create", "--json", #"{"callbackUrl":"http://x"}"#])
        #expect(task.status == 1 && task.err.contains("neither"))
        await bridge.stop()
    }
}
