import AMQPClient
import AQHTTP
import AQTestSupport
import Foundation
import Synchronization
import Testing

/// The aq-bridge binary as an operator runs it: what it says and how it exits.
@Suite(.serialized, .timeLimit(.minutes(2))) struct BridgeCommandTests {
    static var binary: URL { TestEnvironment.builtProgram("aq-bridge") }

    @Test func aFlagIsHeldToTheSameRulesAsTheFileAndTheEnvironment() throws {
        for prefetch in ["0", "70000"] {
            let result = try TestEnvironment.run(Self.binary, ["--prefetch", prefetch, "--listen", ""], environment: ["AQ_AMQP_URL": "amqp://127.0.0.1:1/"])
            #expect(result.status == 1)
            #expect(result.err.contains("prefetch must be in 1...65535"), "\(result.err)")
        }
        let duration = try TestEnvironment.run(Self.binary, ["--shutdown-grace", "soon", "--listen", ""])
        #expect(duration.status == 1)
        #expect(duration.err.contains("--shutdown-grace must be a duration"), "\(duration.err)")
    }

    @Test func anUnreadableTLSFileFailsAtOnce() throws {
        let started = ContinuousClock.now
        let result = try TestEnvironment.run(Self.binary, ["--listen", "", "--topology", TestEnvironment.repositoryRoot.appendingPathComponent("topology").path],
                                             environment: ["AQ_AMQP_URL": "amqps://guest:guest@127.0.0.1:1/?cacertfile=/nonexistent/ca.pem"])
        #expect(result.status == 1)
        #expect(result.err.contains("cacertfile '/nonexistent/ca.pem' cannot be read"), "\(result.err)")
        #expect(ContinuousClock.now - started < .seconds(20), "no retrying a file that cannot be read")
    }

    @Test func sigtermWhileTheBrokerIsUnreachableIsACleanStop() async throws {
        let (probe, port) = try TestEnvironment.listenOnLoopback()
        close(probe)  // nothing listens there now
        let process = Process()
        process.executableURL = Self.binary
        process.arguments = ["--listen", "", "--topology", TestEnvironment.repositoryRoot.appendingPathComponent("topology").path]
        process.environment = ["AQ_AMQP_URL": "amqp://guest:guest@127.0.0.1:\(port)/"]
        let stderr = Pipe()
        process.standardError = stderr
        try process.run()
        // Wait for it to say it is retrying, then stop it.
        var said = ""
        let deadline = ContinuousClock.now + .seconds(20)
        while !said.contains("broker unreachable") && ContinuousClock.now < deadline {
            let chunk = stderr.fileHandleForReading.availableData
            said += String(decoding: chunk, as: UTF8.self)
        }
        #expect(said.contains("broker unreachable"), "\(said)")
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
        #expect(process.terminationReason == .exit)
        #expect(process.terminationStatus == 0, "SIGTERM during the wait for the broker exits 0, not 143")
    }
}

/// The aq-bridge binary's resident memory with large tasks: bounded by max_inflight_bytes, not
/// by how many tasks the broker holds (200 tasks of 1 MiB once took it past 600 MB).
@Suite(.serialized, .timeLimit(.minutes(3))) struct BridgeMemoryTests {
    @Test func largeTasksStayWithinTheMemoryBudget() async throws {
        let (vhost, url, dir) = try await BridgeHarness.prepareVHost()
        defer {
            try? FileManager.default.removeItem(at: dir)
            Task { try? await BridgeHarness.management("DELETE", "/api/vhosts/\(vhost)") }
        }
        let answered = Atomic<Int>(0)
        let server = try HTTPServer { _, responder in
            DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(300)) {
                answered.add(1, ordering: .relaxed)
                responder.respond(.json(#"{"ok":true}"#))
            }
        }
        defer { server.shutdown() }
        let connection = try await AMQPConnection.connect(url)
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let blob = String(repeating: "x", count: 1_000_000)
        let total = 80
        for index in 0..<total {
            let body = #"{"callbackUrl":"http://127.0.0.1:\#(server.port)/cb","payload":{"i":\#(index),"blob":"\#(blob)"},"retries":0}"#
            try await channel.publish(Array(body.utf8), exchange: "aq.tasks", routingKey: "default",
                                      properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent, messageId: "big-\(index)"))
        }
        await connection.close()
        let process = Process()
        process.executableURL = TestEnvironment.builtProgram("aq-bridge")
        process.arguments = ["--listen", "", "--max-inflight-bytes", "\(16 << 20)", "--log-level", "error"]
        process.environment = ["AQ_AMQP_URL": url, "AQ_TOPOLOGY": dir.path, "PATH": "/usr/bin:/bin"]
        try process.run()
        defer { process.terminate(); process.waitUntilExit() }
        let deadline = ContinuousClock.now + .seconds(120)
        while answered.load(ordering: .relaxed) < total && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(answered.load(ordering: .relaxed) >= total, "every task ran")
        let status = try String(contentsOfFile: "/proc/\(process.processIdentifier)/status", encoding: .utf8)
        let peakKiB = status.split(separator: "\n").first { $0.hasPrefix("VmHWM:") }?.split(separator: " ").dropFirst().first.flatMap { Int($0) } ?? 0
        // The debug build's runtime and libraries take about 60 MB of it.
        #expect(peakKiB < 120 << 10, "aq-bridge peaked at \(peakKiB / 1024) MB with a 16 MiB budget for \(total) tasks of 1 MB")
    }
}
