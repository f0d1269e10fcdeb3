import AMQPClient
@testable import AQGateway
import AQHTTP
import AQTestSupport
import Foundation
import Synchronization
import Testing
import Yams

/// aq-gateway as it is deployed: the built binary, a real broker, real HTTP on 127.0.0.1.
final class GatewayProcess: @unchecked Sendable {
    // @unchecked Sendable: `process` is set once in init and only read afterwards (Process is
    // itself thread-safe for terminate/wait); `port` and `url` are constants.
    let process: Process
    let port: Int
    var url: String { "http://127.0.0.1:\(self.port)" }
    static let token = "aqt_test_token_for_the_gateway"
    static let other = "aqt_token_for_reports_only"
    /// Allowed on every queue: the dashboard's.
    static let operatorToken = "aqt_operator_token"

    static var tokens: String {
        let hash = { (token: String) in TokenVerifier.hex(TokenVerifier.sha256(Array(token.utf8))) }
        return "app:\(hash(Self.token)):default|reports,reporter:\(hash(Self.other)):reports,ops:\(hash(Self.operatorToken)):*"
    }

    /// `waitForBroker`: return once `/readyz` says the gateway reached the broker (it listens
    /// before its AMQP connection is made; a request in between gets 503, rightly).
    init(amqpURL: String, topology: String, environment: [String: String] = [:], arguments: [String] = [], waitForBroker: Bool = true) throws {
        let process = Process()
        process.executableURL = TestEnvironment.builtProgram("aq-gateway")
        process.arguments = ["--listen", "127.0.0.1:0", "--amqp", amqpURL, "--topology", topology, "--management-url", TestEnvironment.managementURL] + arguments
        process.environment = ProcessInfo.processInfo.environment.merging(["AQ_GATEWAY_TOKENS": Self.tokens].merging(environment) { $1 }) { $1 }
        let err = Pipe()
        process.standardError = err
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        // The log line that names the bound port.
        var seen = ""
        let deadline = Date().addingTimeInterval(30)
        var port: Int?
        while port == nil, Date() < deadline, process.isRunning {
            let data = err.fileHandleForReading.availableData
            if data.isEmpty { Thread.sleep(forTimeInterval: 0.02); continue }
            seen += String(decoding: data, as: UTF8.self)
            if let range = seen.range(of: "address=http://127.0.0.1:") {
                port = Int(seen[range.upperBound...].prefix { $0.isNumber })
            }
        }
        guard let port else {
            process.terminate()
            throw TestFailure("aq-gateway did not start: \(seen)")
        }
        self.process = process
        self.port = port
        // Keep draining its log so it never blocks on a full pipe.
        err.fileHandleForReading.readabilityHandler = { handle in _ = handle.availableData }
        guard waitForBroker else { return }
        let curl = URL(fileURLWithPath: "/usr/bin/curl")
        while (try? TestEnvironment.run(curl, ["-fsS", "-o", "/dev/null", "http://127.0.0.1:\(port)/readyz"]).status) != 0 {
            guard Date() < deadline, process.isRunning else {
                process.terminate()
                throw TestFailure("aq-gateway did not reach the broker: \(seen)")
            }
            Thread.sleep(forTimeInterval: 0.02)
        }
    }

    /// SIGTERM, as a service manager stops it; its exit status (0: a graceful stop).
    @discardableResult
    func stop() -> Int32 {
        if self.process.isRunning { self.process.terminate() }
        self.process.waitUntilExit()
        return self.process.terminationStatus
    }

    func post(_ path: String, _ body: String, token: String? = GatewayProcess.token, headers: [String] = []) async throws -> (status: Int, json: [String: Any]) {
        var all = ["Content-Type: application/json"] + headers
        if let token { all.append("Authorization: Bearer \(token)") }
        let response = try await BlockingHTTP.request(method: "POST", url: self.url + path, headers: all, body: Array(body.utf8))
        return (response.status, (try? JSONSerialization.jsonObject(with: Data(response.body))) as? [String: Any] ?? [:])
    }

    func get(_ path: String) async throws -> (status: Int, body: String) {
        let response = try await BlockingHTTP.request(method: "GET", url: self.url + path)
        return (response.status, response.bodyString)
    }
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

@Suite(.serialized, .timeLimit(.minutes(3))) struct GatewayTests {
    @Test func everyAnswerOfTheTaskEndpoint() async throws {
        let receiver = try Receiver()
        receiver.on("/work") { _, _ in .json(#"{"done":true}"#) }
        let bridge = try await BridgeHarness.start()
        let gateway = try GatewayProcess(amqpURL: bridge.amqpURL, topology: bridge.topologyDir.path)
        defer { gateway.stop() }
        let task = #"{"callbackUrl":"\#(receiver.url("/work"))","payload":{"n":1},"webhookUrl":"\#(receiver.url("/hook"))"}"#

        // Who: no token, a wrong one (401); a token not allowed on the queue (403).
        #expect(try await gateway.post("/v1/tasks", task, token: nil).status == 401)
        let wrong = try await gateway.post("/v1/tasks", task, token: "aqt_guess")
        #expect(wrong.status == 401 && wrong.json["error"] as? String == "unauthorized")
        let forbidden = try await gateway.post("/v1/tasks", task, token: GatewayProcess.other)
        #expect(forbidden.status == 403 && forbidden.json["field"] as? String == "queue")
        // What: not JSON (400), a field wrong (422, named), an unknown queue (422), a batch on
        // the task endpoint (422), too big (413). Nothing of it reaches the broker.
        let notJSON = try await gateway.post("/v1/tasks", "{nope")
        #expect(notJSON.status == 400 && notJSON.json["error"] as? String == "invalid_json")
        let noCallback = try await gateway.post("/v1/tasks", #"{"payload":{}}"#)
        #expect(noCallback.status == 422 && noCallback.json["field"] as? String == "callbackUrl", "\(noCallback.json)")
        let badRetries = try await gateway.post("/v1/tasks", #"{"callbackUrl":"http://x/y","retries":"many"}"#)
        #expect(badRetries.status == 422 && badRetries.json["field"] as? String == "retries", "\(badRetries.json)")
        let unknown = try await gateway.post("/v1/tasks?queue=nope", task)
        #expect(unknown.status == 422 && unknown.json["error"] as? String == "unknown_queue")
        // A queue named inside the body counts too: a child or a step on a queue the token may
        // not use is refused, as is a batch part or a chain step message.
        let sneaky = try await gateway.post("/v1/batches?queue=reports", #"{"batch":{},"tasks":[{"callbackUrl":"http://x/y","queue":"default"}]}"#, token: GatewayProcess.other)
        #expect(sneaky.status == 403 && sneaky.json["field"] as? String == "tasks", "\(sneaky.json)")
        let sneakyChain = try await gateway.post("/v1/chains?queue=reports", #"{"chain":{},"steps":[{"callbackUrl":"http://x/y","queue":"default"}]}"#, token: GatewayProcess.other)
        #expect(sneakyChain.status == 403, "\(sneakyChain.json)")
        let part = try await gateway.post("/v1/batches", #"{"batchPart":{"id":"someone-elses","offset":10},"tasks":[{"callbackUrl":"http://x/y"}]}"#)
        #expect(part.status == 422 && part.json["field"] as? String == "batchPart", "\(part.json)")
        let stepMessage = try await gateway.post("/v1/chains", #"{"chain":{"id":"c"},"payload":{},"steps":[{"callbackUrl":"http://x/y"},{"callbackUrl":"http://x/z"}],"step":2,"history":[],"results":[1]}"#)
        #expect(stepMessage.status == 422 && stepMessage.json["field"] as? String == "step", "\(stepMessage.json)")
        let batchHere = try await gateway.post("/v1/tasks", #"{"batch":{},"tasks":[]}"#)
        #expect(batchHere.status == 422 && batchHere.json["error"] as? String == "wrong_endpoint")
        let big = #"{"callbackUrl":"http://x/y","payload":""# + String(repeating: "x", count: (1 << 20) + 10) + #""}"#
        #expect(try await gateway.post("/v1/tasks", big).status == 413)
        #expect(try await bridge.depth("aq.dead") == 0, "refused requests publish nothing")

        // Accepted (202, after the broker's confirm): the task runs, with the request's trace.
        let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        let accepted = try await gateway.post("/v1/tasks", task, headers: ["traceparent: \(trace)"])
        #expect(accepted.status == 202, "\(accepted.json)")
        let id = try #require(accepted.json["taskId"] as? String)
        let calls = try await receiver.wait("/work", count: 1)
        #expect(calls[0].request.header("AsyncQueue-Task-Id") == id && calls[0].request.json?["n"] as? Int == 1)
        #expect(calls[0].request.header("traceparent") == trace)
        let hooks = try await receiver.wait("/hook", count: 1)
        #expect((hooks[0].request.json?["result"] as? [String: Any])?["done"] as? Bool == true)
        // Without a key, the body's taskId names the task.
        let named = try await gateway.post("/v1/tasks", #"{"callbackUrl":"\#(receiver.url("/work"))","taskId":"named-1","payload":{"n":2}}"#)
        #expect(named.status == 202 && named.json["taskId"] as? String == "named-1")
        let namedCall = try await receiver.wait("/work", count: 2)
        #expect(namedCall[1].request.header("AsyncQueue-Task-Id") == "named-1")
        // The other token may use its queue.
        #expect(try await gateway.post("/v1/tasks?queue=reports", task, token: GatewayProcess.other).status == 202)
        _ = try await receiver.wait("/work", count: 3)

        // Health, readiness, metrics.
        #expect(try await gateway.get("/healthz").status == 200)
        #expect(try await gateway.get("/readyz").status == 200)
        let metrics = try await gateway.get("/metrics").body
        #expect(metrics.contains(#"aq_gateway_requests_total{route="/v1/tasks",status="202"} 3"#) && metrics.contains("aq_gateway_broker_connected 1"), "\(metrics)")
        // SIGTERM: a graceful stop, exit status 0.
        #expect(gateway.stop() == 0)
        await bridge.stop()
    }

    @Test func anIdempotentRetryCreatesOneTask() async throws {
        let receiver = try Receiver()
        receiver.on("/once") { _, _ in .json("{}") }
        let bridge = try await BridgeHarness.start()
        let gateway = try GatewayProcess(amqpURL: bridge.amqpURL, topology: bridge.topologyDir.path)
        defer { gateway.stop() }
        let task = #"{"callbackUrl":"\#(receiver.url("/once"))","payload":{"order":42}}"#
        // A client that timed out retries: the same reply, one task, whose id is the key. Some
        // of the retries arrive while the first is still publishing.
        let replies = try await withThrowingTaskGroup(of: (Int, String?).self) { group in
            for _ in 0..<5 {
                group.addTask {
                    let reply = try await gateway.post("/v1/tasks", task, headers: ["Idempotency-Key: order-42"])
                    return (reply.status, reply.json["taskId"] as? String)
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(replies.allSatisfy { $0.0 == 202 && $0.1 == "order-42" }, "\(replies)")
        let again = try await gateway.post("/v1/tasks", task, headers: ["Idempotency-Key: order-42"])
        #expect(again.status == 202 && again.json["taskId"] as? String == "order-42")
        // The key with another request: refused, nothing published.
        let reused = try await gateway.post("/v1/tasks", #"{"callbackUrl":"\#(receiver.url("/once"))","payload":{"order":43}}"#, headers: ["Idempotency-Key: order-42"])
        #expect(reused.status == 422 && reused.json["error"] as? String == "idempotency_key_reused")
        _ = try await receiver.wait("/once", count: 1)
        try await bridge.waitIdle()
        #expect(receiver.requests("/once").count == 1, "one task")
        await bridge.stop()
    }

    @Test func withTheBrokerDownNothingIsAccepted() async throws {
        // Nothing listens on port 9: the gateway runs, keeps trying, and says 503.
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("gw-down-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        try BridgeHarness.topologyYAML.write(to: dir.appendingPathComponent("asyncqueue.yaml"), atomically: true, encoding: .utf8)
        let gateway = try GatewayProcess(amqpURL: "amqp://guest:guest@127.0.0.1:9/%2F", topology: dir.path, waitForBroker: false)
        defer { gateway.stop() }
        let down = try await gateway.post("/v1/tasks", #"{"callbackUrl":"http://127.0.0.1:9/x"}"#)
        #expect(down.status == 503 && down.json["error"] as? String == "broker_unavailable", "\(down.json)")
        #expect(try await gateway.get("/readyz").status == 503)
        #expect(try await gateway.get("/healthz").status == 200)
        // An idempotent request that got 503 is not remembered: its retry publishes (503 again here).
        #expect(try await gateway.post("/v1/tasks", #"{"callbackUrl":"http://127.0.0.1:9/x"}"#, headers: ["Idempotency-Key: k-1"]).status == 503)
        #expect(try await gateway.post("/v1/tasks", #"{"callbackUrl":"http://127.0.0.1:9/x"}"#, headers: ["Idempotency-Key: k-1"]).status == 503)
    }

    @Test func batchesAndChainsOverHTTP() async throws {
        let receiver = try Receiver()
        receiver.on("/price") { request, _ in .json(#"{"p":\#(request.json?["n"] as? Int ?? 0)}"#) }
        receiver.on("/step") { request, _ in .json(#"{"seen":\#(request.json.map { $0.count } ?? 0)}"#) }
        let bridge = try await BridgeHarness.start()
        let gateway = try GatewayProcess(amqpURL: bridge.amqpURL, topology: bridge.topologyDir.path)
        defer { gateway.stop() }
        let children = (1...3).map { #"{"callbackUrl":"\#(receiver.url("/price"))","payload":{"n":\#($0)}}"# }.joined(separator: ",")
        let batch = try await gateway.post("/v1/batches", #"{"batch":{"webhookUrl":"\#(receiver.url("/batch-done"))"},"tasks":[\#(children)]}"#,
                                           headers: ["Idempotency-Key: batch-7"])
        #expect(batch.status == 202 && batch.json["batchId"] as? String == "batch-7" && batch.json["children"] as? Int == 3, "\(batch.json)")
        let report = try #require(try await receiver.wait("/batch-done", count: 1)[0].request.json)
        #expect(report["batchId"] as? String == "batch-7" && report["counts"] as? [String: Int] == ["completed": 3, "failed": 0, "skipped": 0])
        let steps = [#"{"callbackUrl":"\#(receiver.url("/step"))"}"#, #"{"callbackUrl":"\#(receiver.url("/step"))"}"#].joined(separator: ",")
        let chain = try await gateway.post("/v1/chains", #"{"chain":{"id":"c-9","webhookUrl":"\#(receiver.url("/chain-done"))"},"payload":{"a":1},"steps":[\#(steps)]}"#)
        #expect(chain.status == 202 && chain.json["chainId"] as? String == "c-9", "\(chain.json)")
        let done = try #require(try await receiver.wait("/chain-done", count: 1)[0].request.json)
        #expect(done["status"] as? String == "completed")
        let badChain = try await gateway.post("/v1/chains", #"{"chain":{},"steps":[]}"#)
        #expect(badChain.status == 422 && badChain.json["error"] as? String == "invalid_chain", "\(badChain.json)")
        await bridge.stop()
    }
}

extension GatewayTests {
    /// The dashboard in headless Chromium, driven by Selenium (Tests/browser/dashboard_test.py):
    /// sign in, a task appears and completes, a failed one is replayed by clicking and completes.
    @Test(.timeLimit(.minutes(2))) func theDashboardInABrowser() async throws {
        let receiver = try Receiver()
        let fixed = Atomic<Bool>(false)
        receiver.on("/ok") { _, _ in .json(#"{"ok":true}"#) }
        receiver.on("/flaky") { _, _ in fixed.load(ordering: .relaxed) ? .json(#"{"fixed":true}"#) : .text("card declined", status: 422) }
        receiver.on("/fix") { _, _ in
            fixed.store(true, ordering: .relaxed)
            return .json("{}")
        }
        let bridge = try await BridgeHarness.start { $0.events = .all }
        let gateway = try GatewayProcess(amqpURL: bridge.amqpURL, topology: bridge.topologyDir.path)
        defer { gateway.stop() }
        let screenshot = ProcessInfo.processInfo.environment["AQ_DASHBOARD_SCREENSHOT"] ?? ""
        let result = try TestEnvironment.run(URL(fileURLWithPath: InteropTests.python),
                                             [TestEnvironment.repositoryRoot.appendingPathComponent("Tests/browser/dashboard_test.py").path],
                                             environment: ["GATEWAY_URL": gateway.url, "TOKEN": GatewayProcess.operatorToken,
                                                           "RECEIVER_URL": receiver.url(""), "SCREENSHOT": screenshot])
        #expect(result.status == 0, "\(result.out)\(result.err)")
        #expect(result.out.contains("ok: its dead letter is gone"), "\(result.out)")
        #expect(receiver.requests("/flaky").count == 2, "failed once, then the replay completed")
        await bridge.stop()
    }
}

@Suite struct GatewayConfigurationTests {
    @Test func tokensAreHashedAndComparedAndConfigurationComesFromFileAndEnvironment() throws {
        let hash = TokenVerifier.hex(TokenVerifier.sha256(Array("secret".utf8)))
        #expect(hash == "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b")
        var configuration = GatewayConfiguration()
        try configuration.apply(yaml: """
            listen: 127.0.0.1:9000
            tokens:
              - name: shop
                sha256: \(hash)
                queues: [default]
            max_body_bytes: 4096
            idempotency_window: 1h
            """, source: "test.yaml")
        #expect(configuration.listen == "127.0.0.1:9000" && configuration.maxBodyBytes == 4096 && configuration.idempotencyWindow == .seconds(3600))
        let verifier = TokenVerifier(configuration.tokens)
        #expect(verifier.verify(authorization: "Bearer secret")?.name == "shop")
        #expect(verifier.verify(authorization: "bearer secret")?.allows(queue: "default") == true)
        #expect(verifier.verify(authorization: "Bearer secret")?.allows(queue: "reports") == false)
        #expect(verifier.verify(authorization: "Bearer secreT") == nil && verifier.verify(authorization: "Basic c2VjcmV0") == nil)
        #expect(verifier.verify(authorization: nil) == nil)
        #expect(throws: GatewayConfiguration.Invalid.self) { try configuration.apply(yaml: "tokenz: []", source: "t") }
        #expect(throws: GatewayConfiguration.Invalid.self) { try configuration.apply(yaml: "tokens:\n  - name: x\n    sha256: abc", source: "t") }
        try configuration.apply(environment: ["AQ_GATEWAY_TOKENS": "a:\(hash):*, b:\(hash):reports|default", "AQ_GATEWAY_LISTEN": "0.0.0.0:1"])
        #expect(configuration.tokens.map(\.name) == ["a", "b"] && configuration.tokens[0].allows(queue: "anything"))
        #expect(configuration.tokens[1].queues == ["reports", "default"] && configuration.listen == "0.0.0.0:1")
        #expect(throws: GatewayConfiguration.Invalid.self) { try configuration.apply(environment: ["AQ_GATEWAY_TOKENS": "a:nothex"]) }
        // A token must name its queues: a forgotten list is not every queue.
        #expect(throws: GatewayConfiguration.Invalid.self) { try configuration.apply(environment: ["AQ_GATEWAY_TOKENS": "a:\(hash)"]) }
        #expect(throws: GatewayConfiguration.Invalid.self) { try configuration.apply(yaml: "tokens:\n  - name: x\n    sha256: \(hash)", source: "t") }
        // Ids the gateway makes are random, UUID-shaped.
        let ids = (0..<1000).map { _ in GeneratedIds.next() }
        #expect(Set(ids).count == 1000 && ids.allSatisfy { $0.count == 36 && $0.split(separator: "-").count == 5 })
        // HTML escaping is per Unicode scalar: a quote with a combining mark is still a quote.
        #expect(!Dashboard.esc("x\"\u{301} onmouseover=alert(1)").contains("\""))
        #expect(Dashboard.esc("<a href='x'>&</a>") == "&lt;a href=&#39;x&#39;&gt;&amp;&lt;/a&gt;")
        #expect(Dashboard.time(0) == "00:00:00Z" && Dashboard.time(1_796_170_987_654) == "00:23:07Z")
        #expect(GatewayError.field(in: "callbackUrl must be a string") == "callbackUrl")
        #expect(GatewayError.field(in: "the body is not a JSON object") == nil)
    }
}

extension GatewayTests {
    /// Sources/AQGateway/openapi.yaml against the running server: every operation answers its
    /// example request with a documented status and a body with the documented fields, and one
    /// without a token with 401 (unless documented open).
    @Test func theOpenAPIDocumentMatchesTheServer() async throws {
        let text = try String(contentsOf: TestEnvironment.repositoryRoot.appendingPathComponent("Sources/AQGateway/openapi.yaml"), encoding: .utf8)
        let document = try #require(try Yams.load(yaml: text) as? [String: Any])
        func resolve(_ value: Any?) -> [String: Any]? {
            guard let object = value as? [String: Any] else { return nil }
            guard let ref = object["$ref"] as? String else { return object }
            var node: Any? = document
            for part in ref.dropFirst(2).split(separator: "/") { node = (node as? [String: Any])?[String(part)] }
            return resolve(node)
        }
        let paths = try #require(document["paths"] as? [String: Any])
        #expect(Set(paths.keys) == ["/v1/tasks", "/v1/batches", "/v1/batches/{id}", "/v1/chains", "/v1/chains/{id}", "/healthz", "/readyz", "/metrics"])
        let bridge = try await BridgeHarness.start()
        let gateway = try GatewayProcess(amqpURL: bridge.amqpURL, topology: bridge.topologyDir.path)
        defer { gateway.stop() }
        var checked = 0
        for (path, item) in paths.sorted(by: { $0.key < $1.key }) {
            for (method, value) in (item as? [String: Any] ?? [:]) {
                let operation = try #require(value as? [String: Any])
                let responses = try #require(operation["responses"] as? [String: Any])
                let open = (operation["security"] as? [Any])?.isEmpty == true
                let url = gateway.url + path.replacingOccurrences(of: "{id}", with: "openapi-check")
                var body: [UInt8]?
                if let content = resolve(operation["requestBody"])?["content"] as? [String: Any],
                   let example = (content["application/json"] as? [String: Any])?["example"] {
                    body = Array(try JSONSerialization.data(withJSONObject: example))
                }
                let headers = ["Content-Type: application/json", "Authorization: Bearer \(GatewayProcess.token)", "Idempotency-Key: openapi-check"]
                let response = try await BlockingHTTP.request(method: method.uppercased(), url: url, headers: headers, body: body)
                let status = String(response.status)
                #expect(responses[status] != nil, "\(method) \(path) answered \(status), not documented")
                if let schema = resolve((resolve(responses[status])?["content"] as? [String: Any]).flatMap { ($0["application/json"] as? [String: Any])?["schema"] }) {
                    let json = (try? JSONSerialization.jsonObject(with: Data(response.body))) as? [String: Any] ?? [:]
                    for field in schema["required"] as? [String] ?? [] {
                        #expect(json[field] != nil, "\(method) \(path) \(status): '\(field)' missing in \(response.bodyString)")
                    }
                    for (field, property) in schema["properties"] as? [String: Any] ?? [:] {
                        guard let value = json[field], let type = (property as? [String: Any])?["type"] as? String else { continue }
                        let matches = type == "string" ? value is String : type == "integer" ? (value as? NSNumber).map { !($0 is Bool) && $0.doubleValue == $0.doubleValue.rounded() } ?? false : true
                        #expect(matches, "\(method) \(path) \(status): '\(field)' is not \(type)")
                    }
                }
                if !open {
                    let anonymous = try await BlockingHTTP.request(method: method.uppercased(), url: url, headers: ["Content-Type: application/json"], body: body)
                    #expect(anonymous.status == 401 && responses["401"] != nil, "\(method) \(path) without a token: \(anonymous.status)")
                }
                checked += 1
            }
        }
        #expect(checked == 8)
        await bridge.stop()
    }
}

extension GatewayTests {
    /// examples/node: the seed's four patterns in Node (built-in http and fetch), through the
    /// gateway and a bridge, end to end (examples/node/test.mjs asserts what matters).
    @Test(.timeLimit(.minutes(2))) func theSeedsNodeCodeRunsThroughTheGateway() async throws {
        let node = ["/usr/bin/node", "/usr/local/bin/node"].first { FileManager.default.isExecutableFile(atPath: $0) }
        let path = try #require(node, "needs node (scripts/test installs Debian's nodejs when there is none)")
        let bridge = try await BridgeHarness.start { $0.events = .all }
        let gateway = try GatewayProcess(amqpURL: bridge.amqpURL, topology: bridge.topologyDir.path)
        defer { gateway.stop() }
        let result = try TestEnvironment.run(URL(fileURLWithPath: path),
                                             [TestEnvironment.repositoryRoot.appendingPathComponent("examples/node/test.mjs").path],
                                             environment: ["AQ_GATEWAY_URL": gateway.url, "AQ_GATEWAY_TOKEN": GatewayProcess.token])
        #expect(result.status == 0, "\(result.out)\(result.err)")
        await bridge.stop()
    }
}

extension GatewayTests {
    /// Progress comes from events a trusted user published (the broker checks user_id): one
    /// anybody could publish to aq.events does not make a batch look finished.
    @Test func progressBelievesOnlyTrustedEvents() async throws {
        let bridge = try await BridgeHarness.start()
        let gateway = try GatewayProcess(amqpURL: bridge.amqpURL, topology: bridge.topologyDir.path)
        defer { gateway.stop() }
        func event(_ id: String) -> String {
            #"{"event":"batch.ended","batchId":"\#(id)","taskId":"\#(id)","queue":"default","status":"completed","size":1,"settled":1,"failed":0}"#
        }
        let user = try AMQPConfiguration(url: bridge.amqpURL).user
        try await bridge.channel.publish(event("forged"), exchange: "aq.events", routingKey: "batch.ended.default")
        try await bridge.channel.publish(event("genuine"), exchange: "aq.events", routingKey: "batch.ended.default",
                                         properties: AMQPProperties(userId: user))
        let headers = ["Authorization: Bearer \(GatewayProcess.operatorToken)"]
        var genuine = try await BlockingHTTP.request(method: "GET", url: gateway.url + "/v1/batches/genuine", headers: headers)
        let deadline = ContinuousClock.now + .seconds(20)
        while genuine.status != 200, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(100))  // the gateway's events queue binds at start
            try await bridge.channel.publish(event("genuine"), exchange: "aq.events", routingKey: "batch.ended.default", properties: AMQPProperties(userId: user))
            try await bridge.channel.publish(event("forged"), exchange: "aq.events", routingKey: "batch.ended.default")
            genuine = try await BlockingHTTP.request(method: "GET", url: gateway.url + "/v1/batches/genuine", headers: headers)
        }
        #expect(genuine.status == 200 && genuine.bodyString.contains("\"completed\""), "\(genuine.bodyString)")
        let forged = try await BlockingHTTP.request(method: "GET", url: gateway.url + "/v1/batches/forged", headers: headers)
        #expect(forged.status == 404, "\(forged.bodyString)")
        // A token limited to another queue does not see it.
        let other = try await BlockingHTTP.request(method: "GET", url: gateway.url + "/v1/batches/genuine", headers: ["Authorization: Bearer \(GatewayProcess.other)"])
        #expect(other.status == 404)
        await bridge.stop()
    }
}

extension GatewayTests {
    /// Tokens share the gateway's AMQP user; the gateway names the token (`aq-tenant`, vouched
    /// for by its user_id) so a bridge takes a batch's re-create only from the token that made
    /// it: another token reusing the id is refused and cannot add children to it.
    @Test func anotherTokenCannotTakeOverABatchById() async throws {
        let receiver = try Receiver()
        receiver.on("/ok") { _, _ in .json(#"{"mine":true}"#) }
        // Keeps the batch open for a few seconds (retried).
        receiver.on("/slow") { _, nth in nth < 3 ? .text("busy", status: 503) : .json(#"{"mine":true}"#) }
        receiver.on("/intruder") { _, _ in .json(#"{"mine":false}"#) }
        let bridge = try await BridgeHarness.start()
        let gateway = try GatewayProcess(amqpURL: bridge.amqpURL, topology: bridge.topologyDir.path)
        defer { gateway.stop() }
        let mine = try await gateway.post("/v1/batches?queue=reports",
                                          #"{"batch":{"id":"shared-id","webhookUrl":"\#(receiver.url("/done"))"},"tasks":[{"callbackUrl":"\#(receiver.url("/ok"))"},{"callbackUrl":"\#(receiver.url("/slow"))","retries":5}]}"#)
        #expect(mine.status == 202)
        _ = try await receiver.wait("/slow", count: 1)
        let theirs = try await gateway.post("/v1/batches?queue=reports",
                                            #"{"batch":{"id":"shared-id","webhookUrl":"\#(receiver.url("/their-done"))"},"tasks":[{"callbackUrl":"\#(receiver.url("/intruder"))"},{"callbackUrl":"\#(receiver.url("/intruder"))"},{"callbackUrl":"\#(receiver.url("/intruder"))"}]}"#,
                                            token: GatewayProcess.other)
        #expect(theirs.status == 202, "the gateway cannot know; the bridge refuses it")
        let refused = try await receiver.wait("/their-done", count: 1)
        #expect(refused[0].request.bodyString.contains("in use by another publisher"), "\(refused[0].request.bodyString)")
        let done = try #require(try await receiver.wait("/done", count: 1)[0].request.json)
        #expect(done["size"] as? Int == 2 && done["counts"] as? [String: Int] == ["completed": 2, "failed": 0, "skipped": 0], "\(done)")
        #expect(receiver.requests("/intruder").isEmpty)
        await bridge.stop()
    }
}
