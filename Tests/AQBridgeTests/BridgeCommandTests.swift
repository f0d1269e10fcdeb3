import AQTestSupport
import Foundation
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
