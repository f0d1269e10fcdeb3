@testable import AQBridge
import AQHTTP
import AQTopology
import AQTestSupport
import Foundation
import Testing

@Suite struct JSONScanTests {
    @Test func findsTopLevelMembersAndTheirExactBytes() throws {
        let text = #"  {"a": {"x": [1, "}", {"y": null}]}, "b":"q\"uo\u0041te", "c": -1.5e3, "d": true }  "#
        let bytes = Array(text.utf8)
        let members = try JSONScan.members(bytes)
        #expect(String(decoding: bytes[members["a"]!.range], as: UTF8.self) == #"{"x": [1, "}", {"y": null}]}"#)
        #expect(members["a"]?.kind == .object)
        #expect(try JSONScan.decodeString(bytes, members["b"]!.range) == "q\"uoAte")
        #expect(members["c"]?.kind == .number)
        #expect(members["d"]?.kind == .bool)
    }

    @Test(arguments: ["", "{", "{\"a\":}", "{\"a\":1,}", "{'a':1}", "{\"a\":01}", "{\"a\":1} x", "{\"a\":\"\u{01}\"}", "{\"a\":tru}", "[1]"])
    func rejectsWhatIsNotAStrictJSONObject(_ text: String) {
        #expect(throws: JSONScan.Failure.self) { try JSONScan.members(Array(text.utf8)) }
    }

    @Test func validatesAnswersAndQuotesText() {
        #expect(JSONScan.isValid(Array(#" {"ok": [1, 2.5, "x"]} "#.utf8)))
        #expect(JSONScan.isValid(Array("42".utf8)))
        #expect(!JSONScan.isValid(Array("<html>".utf8)))
        #expect(!JSONScan.isValid([]))
        #expect(JSONScan.quote("a\"b\\c\nd\u{01}é") == #""a\"b\\c\nd\u0001é""#)
        #expect(JSONScan.quote("") == #""""#)
        #expect(JSONScan.quote("https://x.test/cb?id=7") == #""https://x.test/cb?id=7""#)
        #expect(JSONScan.quote("日本é\u{7F}") == "\"日本é\u{7F}\"")
        #expect(JSONScan.quote("\u{1F}\t\r") == #""\u001f\t\r""#)
        // Whatever the text, the quoted form reads back as that text.
        var generator = SystemRandomNumberGenerator()
        let alphabet: [Character] = ["a", "\"", "\\", "\n", "\u{00}", "\u{1B}", "é", "😀", "/", " "]
        for _ in 0..<200 {
            let text = String((0..<Int.random(in: 0...12, using: &generator)).map { _ in alphabet.randomElement(using: &generator) ?? "a" })
            let decoded = try? JSONSerialization.jsonObject(with: Data(JSONScan.quote(text).utf8), options: .fragmentsAllowed) as? String
            #expect(decoded == text)
            var appended = Array("x".utf8)
            JSONScan.appendQuoted(text, to: &appended)
            #expect(appended == Array(("x" + JSONScan.quote(text)).utf8))
        }
        #expect(BridgeEngine.resultJSON([]) == Array("null".utf8))
        #expect(BridgeEngine.resultJSON(Array(" \n".utf8)) == Array("null".utf8))
        #expect(BridgeEngine.resultJSON(Array(#"{"a":1}"#.utf8)) == Array(#"{"a":1}"#.utf8))
        #expect(BridgeEngine.resultJSON(Array("plain text".utf8)) == Array(#""plain text""#.utf8))
    }

    /// A range read strictly once is read again by its structure only (chain step messages):
    /// the members found must be the same, byte for byte.
    @Test func aCheckedDocumentReadAgainByStructureFindsTheSameMembers() throws {
        let documents = [
            #"{"a": {"x": [1, "}", {"y": null}]}, "b":"q\"uo\u0041te\\", "c": -1.5e3, "d": true, "e": "日本\n", "f": [[], {}, ""]}"#,
            #"{"chain":{"id":"c\"1"},"steps":[{"callbackUrl":"http://h/a\\\"b","payload":{"k":"\\"}}],"history":[],"results":[0.5e-3,"\u00e9"]}"#,
        ]
        for text in documents {
            let bytes = Array(text.utf8)
            let strict = try JSONScan.Fields(bytes)
            let checked = try JSONScan.Fields(bytes, in: bytes.indices, validated: true)
            for key: StaticString in ["a", "b", "c", "d", "e", "f", "chain", "steps", "history", "results"] {
                #expect(strict[key]?.range == checked[key]?.range && strict[key]?.kind == checked[key]?.kind, "\(key) in \(text)")
                guard let member = strict[key], member.kind == .array else { continue }
                var a: [Range<Int>] = [], b: [Range<Int>] = []
                try JSONScan.forEachElement(bytes, in: member.range) { (m: JSONScan.Member) throws(JSONScan.Failure) in a.append(m.range) }
                try JSONScan.forEachElement(bytes, in: member.range, validated: true) { (m: JSONScan.Member) throws(JSONScan.Failure) in b.append(m.range) }
                #expect(a == b)
            }
        }
    }
}

@Suite struct TaskParserTests {
    let defaults = TaskDefaults(retries: 3, timeout: .seconds(30), maxTimeout: .seconds(600), maxPayloadBytes: 4096)

    @Test func readsEveryFieldAndAppliesDefaults() throws {
        let body = Array(#"{"callbackUrl":"https://app.example/cb?x=1","payload":{"k":[1,2]},"webhookUrl":"http://hooks.example/h","retries":5,"timeout":2.5}"#.utf8)
        let task = try TaskParser.parse(body, messageId: "m-1", defaults: self.defaults).get()
        #expect(task.id == "m-1")
        #expect(task.callbackURL == "https://app.example/cb?x=1")
        #expect(Array(task.payload) == Array(#"{"k":[1,2]}"#.utf8))
        #expect(task.webhookURL == "http://hooks.example/h")
        #expect(task.retries == 5)
        #expect(task.timeout == .milliseconds(2500))
        let minimal = try TaskParser.parse(Array(#"{"callbackUrl":"http://a/"}"#.utf8), messageId: nil, defaults: self.defaults).get()
        #expect(Array(minimal.payload) == Array("null".utf8))
        #expect(minimal.retries == 3)
        #expect(minimal.timeout == .seconds(30))
        #expect(minimal.webhookURL == nil)
        #expect(UUID(uuidString: minimal.id) != nil, "an id is assigned")
        let bodyId = try TaskParser.parse(Array(#"{"callbackUrl":"http://a/","taskId":"t-9"}"#.utf8), messageId: nil, defaults: self.defaults).get()
        #expect(bodyId.id == "t-9")
    }

    /// The fields most tasks leave out (held apart in ``TaskSpec``) read back as parsed, and
    /// change in one copy only; cleared, the task equals one that never had them.
    @Test func fieldsHeldApartBehaveAsValues() throws {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        let body = Array(#"{"callbackUrl":"http://a/","failureWebhookUrl":"http://f/","delay":5,"traceparent":"\#(traceparent)"}"#.utf8)
        var task = try TaskParser.parse(body, messageId: "m-1", defaults: self.defaults).get()
        #expect(task.failureWebhookURL == "http://f/")
        #expect(task.due == .after(.seconds(5)))
        #expect(task.traceparent == traceparent)
        let copy = task
        task.traceparent = nil
        task.failureWebhookURL = nil
        #expect(copy.traceparent == traceparent && copy.failureWebhookURL == "http://f/")
        #expect(task.traceparent == nil && task.failureWebhookURL == nil && task.due == .after(.seconds(5)))
        task.due = nil
        let plain = try TaskParser.parse(Array(#"{"callbackUrl":"http://a/"}"#.utf8), messageId: "m-1", defaults: self.defaults).get()
        #expect(task == plain)
        #expect(copy != plain)
    }

    @Test(arguments: [
        (#"{"callbackUrl":"http://a/","timeout":601}"#, "over the bridge's limit"),
        (#"{"callbackUrl":"http://a/","retries":101}"#, "from 0 to 100"),
        (#"{"callbackUrl":"http://a/","retries":1.5}"#, "whole number"),
        (#"{"callbackUrl":"http:///nohost"}"#, "has no host"),
        (#"{"callbackUrl":"http://a b/"}"#, "spaces"),
        (#"{"callbackUrl":"http://a/","webhookUrl":5}"#, "webhookUrl must be a string"),
        (#"{"callbackUrl":"http://a/","timeout":1e400}"#, "positive number of seconds"),
        (#"{"callbackUrl":"http://a/","timeout":1e30}"#, "over the bridge's limit"),
        (#"{"callbackUrl":"http://a/","retries":99999999999999999999}"#, "whole number"),
    ])
    func rejectsBadFields(_ body: String, _ expected: String) {
        let result = TaskParser.parse(Array(body.utf8), messageId: "id", defaults: self.defaults)
        guard case .failure(let error) = result else {
            Issue.record("accepted \(body)")
            return
        }
        #expect(error.reason.contains(expected), "\(error.reason)")
    }

    @Test func keysWrittenWithEscapesStillCount() throws {
        let body = Array(#"{"callback\u0055rl":"http://a/","pay\u006coad":[1]}"#.utf8)
        let task = try TaskParser.parse(body, messageId: "x", defaults: self.defaults).get()
        #expect(task.callbackURL == "http://a/")
        #expect(Array(task.payload) == Array("[1]".utf8))
    }

    @Test func rejectsIdsThatCouldInjectHeaders() {
        let result = TaskParser.parse(Array(#"{"callbackUrl":"http://a/"}"#.utf8), messageId: "x\r\nX-Evil: 1", defaults: self.defaults)
        #expect((try? result.get()) == nil)
    }
}

@Suite struct RetryPolicyTests {
    func answer(_ status: Int, retryAfter: String? = nil, noRetry: String? = nil) -> Result<HTTPAnswer, HTTPError> {
        .success(HTTPAnswer(status: status, body: [], retryAfter: retryAfter, noRetry: noRetry))
    }

    @Test func classifiesAnswers() {
        #expect(RetryPolicy.classify(self.answer(204), timeout: .seconds(1)) == .success(status: 204))
        for status in [408, 425, 429, 500, 502, 503, 504, 599] {
            guard case .retryable = RetryPolicy.classify(self.answer(status), timeout: .seconds(1)) else {
                Issue.record("\(status) should be retried")
                continue
            }
        }
        for status in [301, 400, 401, 403, 404, 410, 413, 422, 501, 505] {
            guard case .permanent = RetryPolicy.classify(self.answer(status), timeout: .seconds(1)) else {
                Issue.record("\(status) should not be retried")
                continue
            }
        }
        guard case .permanent = RetryPolicy.classify(self.answer(503, noRetry: "true"), timeout: .seconds(1)) else {
            Issue.record("AsyncQueue-No-Retry is honoured")
            return
        }
        #expect(RetryPolicy.classify(self.answer(429, retryAfter: "7"), timeout: .seconds(1))
            == .retryable(reason: "HTTP 429", status: 429, retryAfter: .seconds(7)))
    }

    @Test func classifiesTransportFailures() {
        func outcome(_ kind: HTTPError.Kind) -> AttemptOutcome {
            RetryPolicy.classify(.failure(HTTPError(kind: kind, message: "m")), timeout: .seconds(2))
        }
        #expect(outcome(.timeout) == .retryable(reason: "no answer within 2s", status: nil, retryAfter: nil))
        for kind in [HTTPError.Kind.couldNotConnect, .couldNotResolve, .tls, .other] {
            guard case .retryable = outcome(kind) else { Issue.record("\(kind) should be retried"); continue }
        }
        guard case .permanent = outcome(.tooLarge) else { Issue.record("too large is final"); return }
        guard case .permanent = outcome(.invalidURL) else { Issue.record("invalid URL is final"); return }
    }

    @Test func retryAfterParsing() {
        #expect(RetryPolicy.parseRetryAfter("120") == .seconds(120))
        #expect(RetryPolicy.parseRetryAfter("garbage") == nil)
        let future = Date().addingTimeInterval(90)
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss 'GMT'"
        let parsed = RetryPolicy.parseRetryAfter(formatter.string(from: future))
        #expect(parsed != nil && parsed! >= .seconds(85) && parsed! <= .seconds(91))
    }

    @Test func tiersFollowTheRetryNumberAndRetryAfter() {
        let tiers: [TimeSpan] = [.seconds(1), .seconds(5), .seconds(30)]
        #expect(RetryPolicy.tier(forRetry: 1, retryAfter: nil, tiers: tiers, jitter: false) == .seconds(1))
        #expect(RetryPolicy.tier(forRetry: 2, retryAfter: nil, tiers: tiers, jitter: false) == .seconds(5))
        #expect(RetryPolicy.tier(forRetry: 9, retryAfter: nil, tiers: tiers, jitter: false) == .seconds(30))
        #expect(RetryPolicy.tier(forRetry: 1, retryAfter: .seconds(4), tiers: tiers) == .seconds(5))
        #expect(RetryPolicy.tier(forRetry: 1, retryAfter: .seconds(600), tiers: tiers) == .seconds(30))
        let jittered = Set((0..<200).compactMap { _ in RetryPolicy.tier(forRetry: 1, retryAfter: nil, tiers: tiers) })
        #expect(jittered == [.seconds(1), .seconds(5)], "jitter spreads a retry over two tiers")
    }
}

@Suite struct SigningTests {
    func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }

    @Test func sha256KnownAnswers() {
        #expect(self.hex(SHA256.hash(Array("".utf8))) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(self.hex(SHA256.hash(Array("abc".utf8))) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(self.hex(SHA256.hash(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)))
            == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        #expect(self.hex(SHA256.hash([UInt8](repeating: 0x61, count: 1_000_000)))
            == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
    }

    @Test func hmacRFC4231Vectors() {
        let key = [UInt8](repeating: 0x0b, count: 20)
        #expect(self.hex(HMACSHA256.mac(key: key, message: Array("Hi There".utf8)))
            == "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
        #expect(self.hex(HMACSHA256.mac(key: Array("Jefe".utf8), message: Array("what do ya want for nothing?".utf8)))
            == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        let longKey = [UInt8](repeating: 0xaa, count: 131)
        #expect(self.hex(HMACSHA256.mac(key: longKey, message: Array("Test Using Larger Than Block-Size Key - Hash Key First".utf8)))
            == "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54")
    }

    @Test func standardWebhooksSignature() throws {
        // The example from the Standard Webhooks specification's reference tests.
        let signer = try WebhookSigner(secrets: ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])
        let body = Array(#"{"test": 2432232314}"#.utf8)
        #expect(signer.signature(id: "msg_p5jXN8AQM9LWM0D4loKWxJek", timestamp: 1614265330, body: body)
            == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        // The keyed context the bridge signs with gives the same signature, message after message.
        let context = signer.makeContext()
        for _ in 0..<3 {
            #expect(context.signature(id: "msg_p5jXN8AQM9LWM0D4loKWxJek", timestamp: 1614265330, body: body)
                == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        }
        let rotated = try WebhookSigner(secrets: ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_" + Data("another-secret-key".utf8).base64EncodedString()])
        #expect(rotated.signature(id: "m", timestamp: 1, body: []).split(separator: " ").count == 2)
        #expect(rotated.makeContext().signature(id: "m", timestamp: 1, body: []) == rotated.signature(id: "m", timestamp: 1, body: []))
        // The bridge's header line (hashed in place, base64 by hand) against the plain signer.
        #expect(context.headerLine(id: "msg_p5jXN8AQM9LWM0D4loKWxJek", timestamp: 1614265330, body: body[...])
            == "webhook-signature: v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        let fast = rotated.makeContext()
        for timestamp in [0, 7, -5, 1_764_000_000, Int.max, Int.min] {
            for id in ["", "x", String(repeating: "é", count: 300)] {
                #expect(fast.headerLine(id: id, timestamp: timestamp, body: body[...])
                    == "webhook-signature: " + rotated.signature(id: id, timestamp: timestamp, body: body), "\(id.prefix(3)) \(timestamp)")
                // Appended to the request's header bytes: the same line, after what was there.
                var out = Array("before\u{0}".utf8)
                fast.appendHeaderLine(id: id, timestamp: timestamp, body: body[...], to: &out)
                #expect(out == Array("before\u{0}".utf8) + Array(fast.headerLine(id: id, timestamp: timestamp, body: body[...]).utf8))
            }
        }
        #expect(throws: WebhookSigner.InvalidSecret.self) { try WebhookSigner(secrets: ["whsec_!!!"]) }
        #expect(throws: WebhookSigner.InvalidSecret.self) { try WebhookSigner(secrets: ["short"]) }
    }
}

@Suite struct HeaderLinesTests {
    @Test func linesAreWrittenAsBytesAndTheUnsafeOnesAreFlagged() {
        var lines = HeaderLines(capacity: 8)
        lines.append("A: 1")
        lines.append { $0 += "B: ".utf8; HeaderLines.appendDecimal(42, to: &$0) }
        lines.append("")
        #expect(lines.lines == ["A: 1", "B: 42", ""])
        #expect(lines.count == 3)
        #expect(lines.bytes == Array("A: 1\u{0}B: 42\u{0}\u{0}".utf8))
        #expect(lines.refusedLine == nil)
        for value in [0, 7, -5, 1_764_000_000, Int.max, Int.min] {
            var out: [UInt8] = []
            HeaderLines.appendDecimal(value, to: &out)
            #expect(String(decoding: out, as: UTF8.self) == String(value))
        }
        // CR, LF or NUL inside a line: flagged (the first such line), and the request is refused.
        for bad in ["X: a\r\nEvil: 1", "X: a\nb", "X: a\u{0}Evil: 1"] {
            var unsafe = HeaderLines(["Fine: 1"])
            unsafe.append(bad)
            unsafe.append("Y: \r")
            #expect(unsafe.refusedLine == String(bad.prefix(40)))
        }
    }
}

@Suite struct ConfigurationTests {
    @Test func fileEnvironmentAndPrecedence() throws {
        var config = BridgeConfiguration()
        try config.apply(yaml: """
            # aq-bridge
            amqp_url: amqp://u:p@rabbit:5672/prod
            queues: [default, reports]
            prefetch: 64
            signing_secrets:
              - whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
            webhook_timeout: 10s
            max_task_timeout: 15m
            listen: 0.0.0.0:9000
            """, source: "bridge.yaml")
        #expect(config.queues == ["default", "reports"])
        #expect(config.prefetch == 64)
        #expect(config.signingSecrets.count == 1)
        #expect(config.webhookTimeout == .seconds(10))
        #expect(config.maxTaskTimeout == .seconds(900))
        try config.apply(environment: ["AQ_PREFETCH": "8", "AQ_QUEUE": "aq.work.default"])
        #expect(config.prefetch == 8)
        #expect(config.queues == ["aq.work.default"])
        #expect(!config.redactedDescription.contains(":p@"))
        #expect(config.redactedDescription.contains("u:***@rabbit"))
        #expect(!config.redactedDescription.contains("whsec_"))
    }

    @Test func theShippedExampleConfigurationIsValid() throws {
        var config = BridgeConfiguration()
        try config.apply(file: TestEnvironment.repositoryRoot.appendingPathComponent("deploy/bridge.example.yaml").path)
        try config.validate()
        #expect(config.maxPerHost == 32)
        #expect(try config.addressPolicy().refusal(host: "169.254.169.254", address: nil) != nil)
    }

    @Test func badSettingsAreNamed() {
        var config = BridgeConfiguration()
        #expect(throws: BridgeConfiguration.Invalid.self) { try config.apply(yaml: "prefetch: lots\n", source: "f") }
        #expect(throws: BridgeConfiguration.Invalid.self) { try config.apply(yaml: "colour: blue\n", source: "f") }
        #expect(throws: BridgeConfiguration.Invalid.self) { try config.apply(environment: ["AQ_PREFETCH": "zero"]) }
        // The same rules whatever the source: a flag, the environment or the file.
        for prefetch in [0, 70_000] {
            var flagged = BridgeConfiguration()
            flagged.prefetch = prefetch
            #expect(throws: BridgeConfiguration.Invalid.self) { try flagged.validate() }
        }
        var fromEnvironment = BridgeConfiguration()
        try? fromEnvironment.apply(environment: ["AQ_PREFETCH": "0"])
        #expect(throws: BridgeConfiguration.Invalid.self) { try fromEnvironment.validate() }
        var durations = BridgeConfiguration()
        #expect(throws: Never.self) { try durations.apply(yaml: "shutdown_grace: 1d\nwebhook_timeout: 500ms\nmax_task_timeout: 90\n", source: "f") }
        #expect(durations.shutdownGrace == .seconds(86_400), "durations read like the topology files' (7d, 1d)")
        #expect(durations.webhookTimeout == .milliseconds(500))
        #expect(durations.maxTaskTimeout == .seconds(90), "a bare number is seconds")
        var rules = BridgeConfiguration()
        rules.callbackDeny = ["not a rule/"]
        #expect(throws: BridgeConfiguration.Invalid.self) { try rules.validate() }
        #expect(throws: BridgeConfiguration.Invalid.self) { try config.apply(yaml: "webhook_timeout: 99999999999999999h\n", source: "f") }
    }

    @Test func servedQueuesByNameOrQueueName() throws {
        let spec = try TopologyLoader.parse([(name: "t", text: "work_queues: {default: {retries: 2}, reports: {task_timeout: 40m}}\n")])
        var config = BridgeConfiguration()
        config.queues = ["aq.work.default", "reports"]
        let queues = try BridgeService.servedQueues(spec, configuration: config)
        #expect(queues.map(\.queueName) == ["aq.work.default", "aq.work.reports"])
        #expect(queues[0].defaults.retries == 2)
        #expect(queues[1].defaults.timeout == config.maxTaskTimeout, "clamped under consumer_timeout")
        config.queues = ["nope"]
        #expect(throws: BridgeService.StartupError.self) { try BridgeService.servedQueues(spec, configuration: config) }
    }
}
