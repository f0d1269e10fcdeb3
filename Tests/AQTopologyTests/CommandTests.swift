import AMQPClient
import AQTestSupport
import Foundation
import Testing

/// Runs the built `aq` binary, as an operator would.
@Suite struct CommandTests {
    func run(_ arguments: [String]) throws -> (status: Int32, out: String, err: String) {
        try TestEnvironment.run(TestEnvironment.builtProgram("aq"), arguments, directory: TestEnvironment.repositoryRoot)
    }

    @Test func validateTheShippedFiles() throws {
        let result = try self.run(["topology", "validate"])
        #expect(result.status == 0, "\(result.err)")
        #expect(result.out.hasPrefix("ok: 2 work queue(s)"))
        #expect(result.err.isEmpty)
    }

    @Test func validateABadFileNamesEveryProblemAndFails() throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("bad-\(UUID().uuidString).yaml")
        try "work_queues:\n  default:\n    retries: many\n    colour: blue\n".write(to: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: file) }
        let result = try self.run(["topology", "validate", file.path])
        #expect(result.status == 1)
        #expect(result.err.contains("2 problems"))
        #expect(result.err.contains("\(file.path):3:14 (work_queues.default.retries): expected an integer in 0...100, found 'many'"), "\(result.err)")
        #expect(result.err.contains("(work_queues.default.colour): unknown key 'colour'"))
    }

    @Test func validateTakesFilesAsArgumentsOrWithDashF() throws {
        let dir = TestEnvironment.repositoryRoot.appendingPathComponent("topology").path
        for arguments in [["topology", "validate", dir], ["topology", "validate", "-f", dir], ["topology", "validate", "--file", dir]] {
            let result = try self.run(arguments)
            #expect(result.status == 0, "\(arguments): \(result.err)")
        }
    }

    @Test func planDetailedExitcodeCountsExtraObjects() async throws {
        let vhost = try await TestVHost.make()
        defer { Task { await vhost.delete() } }
        let apply = try self.run(["topology", "apply", "--url", vhost.amqpURL, "--management-url", vhost.managementURL])
        #expect(apply.status == 0, "\(apply.err)")
        let inSync = try self.run(["topology", "plan", "--detailed-exitcode", "--url", vhost.amqpURL, "--management-url", vhost.managementURL])
        #expect(inSync.status == 0, "\(inSync.out)\(inSync.err)")
        let connection = try await AMQPConnection.connect(vhost.amqpURL)
        let channel = try await connection.openChannel()
        try await channel.declareQueue("stray", durable: true)
        await connection.close()
        let extra = try self.run(["topology", "plan", "--detailed-exitcode", "--url", vhost.amqpURL, "--management-url", vhost.managementURL])
        #expect(extra.status == 2, "an extra queue is a difference: \(extra.out)")
        #expect(extra.out.contains("stray"))
    }

    @Test func exportPrintsImportableDefinitions() throws {
        let result = try self.run(["topology", "export", "--vhost", "shop"])
        #expect(result.status == 0, "\(result.err)")
        let json = try JSONSerialization.jsonObject(with: Data(result.out.utf8)) as? [String: Any]
        let queues = json?["queues"] as? [[String: Any]] ?? []
        #expect(queues.contains { $0["name"] as? String == "aq.work.default" && $0["vhost"] as? String == "shop" })
        #expect((json?["policies"] as? [Any])?.count == 7)
    }

    @Test func planAgainstAnUnreachableBrokerFailsClearly() throws {
        let result = try self.run(["topology", "plan", "--url", "amqp://guest:guest@127.0.0.1:1/%2F", "--management-url", "http://127.0.0.1:1"])
        #expect(result.status == 1)
        #expect(result.err.contains("cannot reach the RabbitMQ management API at http://127.0.0.1:1"))
    }

    @Test func everyOptionHasHelp() throws {
        for command in ["validate", "plan", "apply", "export"] {
            let result = try self.run(["topology", command, "--help"])
            #expect(result.status == 0)
            for line in result.out.split(separator: "\n") where line.hasPrefix("  -") {
                #expect(line.split(separator: " ", omittingEmptySubsequences: true).count > 2, "no help text: \(line)")
            }
        }
    }
}
