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

    @Test func aListOfURLsNamesTheNodesOfOneBroker() throws {
        let c = try AMQPConfiguration(url: "amqp://u:p,w@n1:5681/v?heartbeat=7 amqp://u:p,w@n2:5682/v,amqp://n3:5683 amqp://u:p,w@n1:5681/v")
        #expect(c.host == "n1" && c.port == 5681)
        #expect(c.password == "p,w", "a comma in a password is not a separator")
        #expect(c.heartbeat == 7 && c.virtualHost == "v")
        #expect(c.endpoints == [.init(host: "n1", port: 5681), .init(host: "n2", port: 5682), .init(host: "n3", port: 5683)], "a repeated address counts once")
        #expect(c.redactedURL == "amqp://u:***@n1:5681/v amqp://u:***@n2:5682/v amqp://u:***@n3:5683/v")
        #expect(AMQPConfiguration.redact("amqp://u:s1@n1/v amqp://u:s1@n2/v") == "amqp://u:***@n1/v amqp://u:***@n2/v")
        #expect(try AMQPConfiguration(url: "amqp://h").endpoints == [.init(host: "h", port: 5672)])
        for bad in ["amqp://u:p@n1/v amqp://other:p@n2/v", "amqp://u:p@n1/v amqp://u:p@n2/w", "amqp://u:p@n1/v amqps://u:p@n2/v"] {
            #expect(throws: AMQPError.self, "\(bad)") { try AMQPConfiguration(url: bad) }
        }
    }

    /// RabbitMQ's 404s for a queue that exists but cannot be reached now (rabbit_amqqueue's
    /// "absent" reasons), against a queue that is gone.
    @Test func anAbsentQueueIsToldFromAMissingOne() {
        func notFound(_ text: String) -> AMQPError {
            AMQPError(code: .channelClosedByServer, message: "the broker closed the channel: \(text)", replyCode: .notFound, replyText: text)
        }
        for absent in ["NOT_FOUND - home node 'rabbit@n1' of durable queue 'q' in vhost '/' is down or inaccessible",
                       "NOT_FOUND - queue 'q' in vhost '/' process is stopped by supervisor",
                       "NOT_FOUND - queue 'q' in vhost '/' has crashed and failed to restart",
                       "NOT_FOUND - failed to perform operation on queue 'q' in vhost '/' due to timeout"] {
            #expect(notFound(absent).isQueueUnavailable, "\(absent)")
        }
        #expect(!notFound("NOT_FOUND - no queue 'q' in vhost '/'").isQueueUnavailable)
        #expect(!AMQPError(code: .channelClosedByServer, message: "is down or inaccessible", replyCode: .accessRefused).isQueueUnavailable)
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
