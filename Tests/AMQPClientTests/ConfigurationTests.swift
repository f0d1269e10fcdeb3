import Testing
@testable import AMQPClient

@Suite struct ConfigurationTests {
    @Test func parsesAFullURL() throws {
        let c = try AMQPConfiguration(url: "amqp://bob:s%40cret@broker.local:5673/prod%2Fa?heartbeat=5&connection_name=api&channel_max=100")
        #expect(c.host == "broker.local")
        #expect(c.port == 5673)
        #expect(c.user == "bob")
        #expect(c.password == "s@cret")
        #expect(c.virtualHost == "prod/a")
        #expect(c.heartbeat == 5)
        #expect(c.connectionName == "api")
        #expect(c.channelMax == 100)
        #expect(c.tls == nil)
    }

    @Test func defaults() throws {
        let plain = try AMQPConfiguration(url: "amqp://localhost")
        #expect(plain.port == 5672)
        #expect(plain.user == "guest")
        #expect(plain.virtualHost == "/")
        #expect(plain.heartbeat == 30)
        let encodedRoot = try AMQPConfiguration(url: "amqp://localhost/%2F")
        #expect(encodedRoot.virtualHost == "/")
        let tls = try AMQPConfiguration(url: "amqps://h/?cacertfile=/etc/ca.pem&certfile=/c.pem&keyfile=/k.pem&verify=verify_none")
        #expect(tls.port == 5671)
        #expect(tls.tls?.caFile == "/etc/ca.pem")
        #expect(tls.tls?.certificateFile == "/c.pem")
        #expect(tls.tls?.keyFile == "/k.pem")
        #expect(tls.tls?.verifyPeer == false)
    }

    @Test(arguments: [
        ("http://localhost", "scheme must be amqp or amqps"),
        ("amqp://localhost:70000", "out of range"),
        ("amqp://localhost/?heartbeat=abc", "heartbeat must be an integer"),
        ("amqp://localhost/?bogus=1", "unknown query parameter 'bogus'"),
        ("amqp://localhost/?cacertfile=/x", "needs the amqps scheme"),
        ("amqp://localhost/a/b", "one path segment"),
        ("not a url at all", "scheme"),
    ])
    func rejectsBadURLsNamingTheProblem(url: String, expected: String) {
        do {
            _ = try AMQPConfiguration(url: url)
            Issue.record("expected \(url) to be rejected")
        } catch let error as AMQPError {
            #expect(error.code == .invalidURL)
            #expect(error.message.contains(expected), "\(error.message)")
        } catch {
            Issue.record("unexpected error \(error)")
        }
    }

    @Test func redactsPasswords() throws {
        #expect(AMQPConfiguration.redact("amqp://u:secret@h:1/v") == "amqp://u:***@h:1/v")
        #expect(AMQPConfiguration.redact("amqp://h/v") == "amqp://h/v")
        let error = #expect(throws: AMQPError.self) { try AMQPConfiguration(url: "amqp://u:hunter2@h:99999/") }
        #expect(error?.message.contains("hunter2") == false)
        #expect(try AMQPConfiguration(url: "amqp://u:pw@h/").redactedURL == "amqp://u:***@h:5672/%2F")
    }

    @Test func recoveryBackoffDoublesUpToTheCap() {
        let recovery = AMQPConfiguration.Recovery(initialDelay: .milliseconds(100), maximumDelay: .seconds(1))
        #expect(recovery.delay(forAttempt: 1) == .milliseconds(100))
        #expect(recovery.delay(forAttempt: 2) == .milliseconds(200))
        #expect(recovery.delay(forAttempt: 4) == .milliseconds(800))
        #expect(recovery.delay(forAttempt: 5) == .seconds(1))
        #expect(recovery.delay(forAttempt: 50) == .seconds(1))
    }
}
