import AMQPClient
import AQBridge
import AQTopology
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import Synchronization

/// The operator's page: server-rendered HTML, a few lines of JavaScript that refresh the live part
/// every two seconds, no external resources (it works without internet access). Signed in with an
/// operator token (one allowed on every queue, `*`), kept in an HttpOnly, SameSite=Strict cookie.
final class Dashboard: Sendable {
    let api: GatewayAPI
    let monitor: EventMonitor
    let target: BrokerTarget
    let logger: Logger

    init(api: GatewayAPI, monitor: EventMonitor, target: BrokerTarget, logger: Logger) {
        self.api = api
        self.monitor = monitor
        self.target = target
        self.logger = logger
    }

    /// The management API's numbers, kept for a second (every open page polls).
    let cache = Mutex<(at: ContinuousClock.Instant, queues: [ManagementClient.QueueStats], error: String?)?>(nil)

    static let cookie = "aq_gateway_token"

    /// One dead-letter scan at a time (each reads aq.dead through and holds what it reads): a
    /// second page view waits for none of it, it is told to try again.
    let scanning = Atomic<Bool>(false)

    func oneScanAtATime(_ body: () async -> String) async -> Response {
        guard self.scanning.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged else {
            return Self.html(Self.page("Busy", "<p>Another dead-letter operation is running; try again in a moment.</p>"), status: .serviceUnavailable)
        }
        defer { self.scanning.store(false, ordering: .releasing) }
        return Self.html(await body())
    }

    // MARK: Routes

    func register(on router: Router<BasicRequestContext>) {
        router.get("/dashboard") { request, _ -> Response in
            guard self.operator(request) != nil else { return Self.html(Self.loginPage(error: nil)) }
            return Self.html(self.mainPage())
        }
        router.post("/dashboard/login") { request, _ -> Response in
            let form = try await Self.form(request)
            let token = form["token"] ?? ""
            guard let found = self.api.verifier.verify(authorization: "Bearer " + token), found.allows(queue: "*") else {
                return Self.html(Self.loginPage(error: "That is not an operator token (one allowed on every queue, *)."), status: .unauthorized)
            }
            var response = Response(status: .seeOther, headers: [.location: "/dashboard"])
            response.headers[.setCookie] = "\(Self.cookie)=\(Self.cookieSafe(token)); Path=/; HttpOnly; SameSite=Strict"
            return response
        }
        router.post("/dashboard/logout") { _, _ -> Response in
            var response = Response(status: .seeOther, headers: [.location: "/dashboard"])
            response.headers[.setCookie] = "\(Self.cookie)=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
            return response
        }
        router.get("/dashboard/live") { request, _ -> Response in
            guard self.operator(request) != nil else { return Response(status: .unauthorized) }
            return Self.html(await self.livePart())
        }
        router.get("/dashboard/dlq") { request, _ -> Response in
            guard self.operator(request) != nil else { return Self.html(Self.loginPage(error: nil)) }
            let query = Self.query(request)
            return await self.oneScanAtATime { await self.deadLetterPage(query) }
        }
        router.get("/dashboard/dlq/show") { request, _ -> Response in
            guard self.operator(request) != nil else { return Self.html(Self.loginPage(error: nil)) }
            let task = Self.query(request)["task"] ?? ""
            return await self.oneScanAtATime { await self.letterPage(task) }
        }
        for action in ["replay", "purge"] {
            router.post(RouterPath("/dashboard/dlq/\(action)")) { request, _ -> Response in
                guard self.operator(request) != nil else { return Self.html(Self.loginPage(error: nil), status: .unauthorized) }
                // A form of ours (SameSite=Strict already keeps other sites' posts from carrying the cookie).
                if let origin = request.headers[.origin], let host = request.head.authority, origin != "http://\(host)", origin != "https://\(host)" {
                    return Self.html(Self.page("Refused", "<p>A request from another site.</p>"), status: .forbidden)
                }
                let form = try await Self.form(request)
                return await self.oneScanAtATime { await self.act(action, form) }
            }
        }
    }

    /// The operator token the request's cookie carries, if any.
    func `operator`(_ request: Request) -> GatewayToken? {
        guard let header = request.headers[.cookie] else { return nil }
        for part in header.split(separator: ";") {
            let pair = part.trimmingCharacters(in: .whitespaces)
            guard pair.hasPrefix(Self.cookie + "=") else { continue }
            let token = String(pair.dropFirst(Self.cookie.count + 1))
            if let found = self.api.verifier.verify(authorization: "Bearer " + token), found.allows(queue: "*") { return found }
        }
        return nil
    }

    // MARK: Pages

    static func loginPage(error: String?) -> String {
        self.page("Sign in", """
            <form method="post" action="/dashboard/login" class="card">
              <p>An operator token (one allowed on every queue) opens the dashboard.</p>
              \(error.map { "<p class=\"bad\">\(esc($0))</p>" } ?? "")
              <label>Token <input type="password" name="token" id="token" autofocus></label>
              <button type="submit" id="sign-in">Sign in</button>
            </form>
            """, signedIn: false)
    }

    func mainPage() -> String {
        Self.page("AsyncQueue", """
            <div id="live">Loading…</div>
            <script nonce="\(Self.scriptNonce)">
            async function refresh() {
              try {
                const r = await fetch('/dashboard/live', {credentials: 'same-origin'});
                if (r.ok) document.getElementById('live').innerHTML = await r.text();
              } catch (e) {}
            }
            refresh(); setInterval(refresh, 2000);
            </script>
            """)
    }

    func queueStats() async -> ([ManagementClient.QueueStats], String?) {
        if let cached = self.cache.withLock({ $0 }), ContinuousClock.now - cached.at < .seconds(1) { return (cached.queues, cached.error) }
        var queues: [ManagementClient.QueueStats] = []
        var failure: String?
        do { queues = try await self.target.management.queueStats(vhost: self.target.vhost) } catch { failure = "\(error)" }
        self.cache.withLock { $0 = (.now, queues, failure) }
        return (queues, failure)
    }

    func livePart() async -> String {
        let spec = self.api.spec
        let (queues, failure) = await self.queueStats()
        let byName = Dictionary(queues.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        let snapshot = self.monitor.snapshot()
        var out = "<section><h2>Work queues</h2>"
        if let failure { out += "<p class=\"bad\">Management API: \(Self.esc(failure))</p>" }
        out += "<table id=\"queues\"><tr><th>queue</th><th>ready</th><th>in flight</th><th>in/s</th><th>out/s</th><th>bridges (consumers)</th></tr>"
        var inFlight = 0
        for queue in spec.workQueues {
            let stats = byName[spec.queueName(forWorkQueue: queue.name)]
            inFlight += stats?.unacknowledged ?? 0
            out += "<tr><td>\(Self.esc(queue.name))</td><td>\(stats?.ready ?? 0)</td><td>\(stats?.unacknowledged ?? 0)</td>"
            out += "<td>\(String(format: "%.1f", stats?.rateIn ?? 0))</td><td>\(String(format: "%.1f", stats?.rateOut ?? 0))</td><td>\(stats?.consumers ?? 0)</td></tr>"
        }
        out += "</table>"
        let retries = spec.retryTiers.map { tier -> String in
            "\(tier.description): \(byName[spec.retryQueueName(for: tier)].map { $0.ready + $0.unacknowledged } ?? 0)"
        }
        let dead = byName[spec.deadLetterQueue].map { $0.ready + $0.unacknowledged } ?? 0
        out += "<p>Tasks in flight: <b id=\"in-flight\">\(inFlight)</b> · retries waiting: \(Self.esc(retries.joined(separator: ", "))) · "
        out += "dead letters: <a id=\"dead-count\" href=\"/dashboard/dlq\">\(dead)</a></p></section>"
        out += "<section><h2>Last hour</h2>\(Self.chart(snapshot.minutes))</section>"
        out += "<section><h2>Recent tasks</h2><table id=\"tasks\"><tr><th>task</th><th>queue</th><th>status</th><th>attempt</th><th></th><th>when</th></tr>"
        for task in snapshot.tasks.prefix(30) {
            out += "<tr data-task=\"\(Self.esc(task.id))\"><td>\(Self.esc(task.id))</td><td>\(Self.esc(task.queue))</td><td class=\"status \(Self.esc(task.status))\">\(Self.esc(task.status))</td>"
            out += "<td>\(task.attempt)</td><td>\(Self.esc(task.detail))</td><td>\(Self.time(task.at))</td></tr>"
        }
        if snapshot.tasks.isEmpty { out += "<tr><td colspan=6>None seen yet (the bridges publish task events with <code>events: all</code>).</td></tr>" }
        out += "</table></section>"
        out += "<section><h2>Recent failures</h2><table id=\"failures\"><tr><th>task</th><th>queue</th><th>what</th><th>reason</th><th>when</th></tr>"
        for failure in snapshot.failures.prefix(20) {
            out += "<tr><td>\(Self.esc(failure.id))</td><td>\(Self.esc(failure.queue))</td><td>\(Self.esc(failure.status))</td><td>\(Self.esc(String(failure.detail.prefix(160))))</td><td>\(Self.time(failure.at))</td></tr>"
        }
        if snapshot.failures.isEmpty { out += "<tr><td colspan=5>None.</td></tr>" }
        out += "</table></section>"
        out += "<section><h2>Batches</h2><table id=\"batches\"><tr><th>batch</th><th>queue</th><th>status</th><th>settled</th><th>failed</th><th>size</th></tr>"
        for batch in snapshot.batches.prefix(20) {
            out += "<tr><td>\(Self.esc(batch.id))</td><td>\(Self.esc(batch.queue))</td><td>\(Self.esc(batch.status))</td><td>\(batch.settled)</td><td>\(batch.failed)</td><td>\(batch.size)</td></tr>"
        }
        if snapshot.batches.isEmpty { out += "<tr><td colspan=6>None seen yet.</td></tr>" }
        out += "</table></section>"
        out += "<section><h2>Chains</h2><table id=\"chains\"><tr><th>chain</th><th>queue</th><th>status</th><th>steps done</th></tr>"
        for chain in snapshot.chains.prefix(20) {
            let steps = chain.steps.map { "\(chain.step) of \($0)" } ?? (chain.failedStep.map { "failed at \($0)" } ?? "\(chain.step)")
            out += "<tr><td>\(Self.esc(chain.id))</td><td>\(Self.esc(chain.queue))</td><td>\(Self.esc(chain.status))</td><td>\(steps)</td></tr>"
        }
        if snapshot.chains.isEmpty { out += "<tr><td colspan=4>None seen yet.</td></tr>" }
        out += "</table></section><p class=\"small\">\(snapshot.received) events read · refreshed \(Self.time(Int64(Date().timeIntervalSince1970 * 1000)))</p>"
        return out
    }

    /// Completed (green) and failed (red) tasks per minute over the last hour, as an SVG.
    static func chart(_ minutes: [EventMonitor.Minute]) -> String {
        let now = Int64(Date().timeIntervalSince1970) / 60
        let byMinute = Dictionary(minutes.map { ($0.minute, $0) }, uniquingKeysWith: { a, _ in a })
        let buckets = (0..<60).map { byMinute[now - 59 + Int64($0)] ?? EventMonitor.Minute(minute: now - 59 + Int64($0)) }
        let peak = max(1, buckets.map { $0.completed + $0.failed }.max() ?? 1)
        var svg = "<svg id=\"chart\" viewBox=\"0 0 600 120\" width=\"600\" height=\"120\" role=\"img\" aria-label=\"tasks per minute\">"
        for (i, bucket) in buckets.enumerated() {
            let x = i * 10
            let ok = Double(bucket.completed) / Double(peak) * 100, bad = Double(bucket.failed) / Double(peak) * 100
            if bucket.completed > 0 {
                svg += "<rect x=\"\(x)\" y=\"\(String(format: "%.1f", 105 - ok))\" width=\"8\" height=\"\(String(format: "%.1f", ok))\" fill=\"#3a7\"><title>\(bucket.completed) completed</title></rect>"
            }
            if bucket.failed > 0 {
                svg += "<rect x=\"\(x)\" y=\"\(String(format: "%.1f", 105 - ok - bad))\" width=\"8\" height=\"\(String(format: "%.1f", bad))\" fill=\"#c33\"><title>\(bucket.failed) failed</title></rect>"
            }
        }
        svg += "<line x1=\"0\" y1=\"105.5\" x2=\"600\" y2=\"105.5\" stroke=\"#999\"/><text x=\"0\" y=\"118\" font-size=\"10\">−60 min</text>"
        svg += "<text x=\"560\" y=\"118\" font-size=\"10\">now</text><text x=\"2\" y=\"10\" font-size=\"10\">\(peak)/min</text></svg>"
        let total = buckets.reduce((0, 0)) { ($0.0 + $1.completed, $0.1 + $1.failed) }
        return svg + "<p class=\"small\">\(total.0) completed, \(total.1) failed in the last hour.</p>"
    }

    func filter(_ fields: [String: String]) -> DeadLetterFilter {
        func list(_ key: String) -> Set<String> { Set((fields[key] ?? "").split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }) }
        return DeadLetterFilter(reasons: list("reason"), queues: list("queue"), tasks: Array(list("task")), since: nil)
    }

    static func filterFields(_ fields: [String: String]) -> String {
        ["reason", "queue", "task"].map { "<input type=\"hidden\" name=\"\($0)\" value=\"\(esc(fields[$0] ?? ""))\">" }.joined()
    }

    func deadLetterPage(_ query: [String: String]) async -> String {
        let filter = self.filter(query)
        var rows: [DeadLetter] = []
        var matching: [String: Int] = [:]
        var total = 0
        var problem: String?
        do {
            total = try await DeadLetterReader(spec: self.api.spec, target: self.target).scan { _, letter in
                guard filter.matches(letter) else { return }
                matching[letter.reason, default: 0] += 1
                if rows.count < 100 { rows.append(letter) }
            }.total
        } catch {
            problem = "\(error)"
        }
        var out = """
            <form method="get" action="/dashboard/dlq" class="card">
              <label>reason <input name="reason" value="\(Self.esc(query["reason"] ?? ""))"></label>
              <label>queue <input name="queue" value="\(Self.esc(query["queue"] ?? ""))"></label>
              <label>task <input name="task" value="\(Self.esc(query["task"] ?? ""))" placeholder="id or prefix*"></label>
              <button type="submit">Filter</button>
            </form>
            """
        if let problem { out += "<p class=\"bad\">\(Self.esc(problem))</p>" }
        let count = matching.values.reduce(0, +)
        out += "<p id=\"dlq-summary\">\(total) dead letter(s); \(count) matching\(count > 0 ? ": " + Self.esc(matching.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")) : "")</p>"
        if count > 0 {
            out += "<form method=\"post\" action=\"/dashboard/dlq/replay\" class=\"inline\">\(Self.filterFields(query))<button id=\"replay-all\">Replay all \(count) matching…</button></form> "
            out += "<form method=\"post\" action=\"/dashboard/dlq/purge\" class=\"inline\">\(Self.filterFields(query))<button id=\"purge-all\" class=\"danger\">Purge all \(count) matching…</button></form>"
        }
        out += "<table id=\"letters\"><tr><th>task</th><th>queue</th><th>reason</th><th>status</th><th>attempts</th><th>when</th><th>error</th><th></th></tr>"
        for letter in rows {
            let id = letter.taskId ?? "-"
            out += "<tr data-task=\"\(Self.esc(id))\"><td><a href=\"/dashboard/dlq/show?task=\(Self.urlEscape(id))\">\(Self.esc(id))</a></td><td>\(Self.esc(letter.queue ?? "-"))</td>"
            out += "<td>\(Self.esc(letter.reason))</td><td>\(letter.status.map(String.init) ?? "-")</td><td>\(letter.attempts.map(String.init) ?? "-")</td>"
            out += "<td>\(letter.deadLetteredAt.map { ISO8601DateFormatter().string(from: $0) } ?? "-")</td><td>\(Self.esc(String((letter.error ?? "").prefix(120))))</td>"
            out += "<td><form method=\"post\" action=\"/dashboard/dlq/replay\" class=\"inline\"><input type=\"hidden\" name=\"task\" value=\"\(Self.esc(id))\">"
            out += "<button class=\"replay\">Replay…</button></form></td></tr>"
        }
        out += "</table>"
        return Self.page("Dead letters", out)
    }

    func letterPage(_ id: String) async -> String {
        var out = ""
        do {
            _ = try await DeadLetterReader(spec: self.api.spec, target: self.target).scan { delivery, letter in
                guard letter.taskId == id || delivery.properties.messageId == id else { return }
                let p = delivery.properties
                out += "<div class=\"card\"><h2>\(Self.esc(letter.taskId ?? "-")) (\(Self.esc(letter.kind.rawValue)))</h2><p>\(Self.esc(letter.reason))\(letter.error.map { ": " + Self.esc($0) } ?? "")</p>"
                if let chain = letter.chainId, let step = letter.chainStep { out += "<p>Chain \(Self.esc(chain)), step \(step): replaying resumes the chain there.</p>" }
                if let batch = letter.batchId { out += "<p>Batch \(Self.esc(batch)), child \(letter.batchIndex.map(String.init) ?? "?").</p>" }
                out += "<h3>Properties</h3><table>"
                for (key, value) in [("message_id", p.messageId), ("correlation_id", p.correlationId), ("reply_to", p.replyTo), ("content_type", p.contentType), ("user_id", p.userId), ("app_id", p.appId)] {
                    if let value { out += "<tr><td>\(key)</td><td>\(Self.esc(value))</td></tr>" }
                }
                out += "</table><h3>Headers</h3><table>"
                for entry in (p.headers ?? AMQPTable()).sorted(by: { $0.key < $1.key }) { out += "<tr><td>\(Self.esc(entry.key))</td><td>\(Self.esc(String(describing: entry.value).prefix(500)))</td></tr>" }
                out += "</table><h3>Body (\(delivery.body.count) bytes)</h3><pre>"
                if let object = try? JSONSerialization.jsonObject(with: Data(delivery.body)),
                   let pretty = try? JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]) {
                    out += Self.esc(String(decoding: pretty.prefix(64 << 10), as: UTF8.self))
                } else {
                    out += Self.esc(String(decoding: delivery.body.prefix(64 << 10), as: UTF8.self))
                }
                out += "</pre><form method=\"post\" action=\"/dashboard/dlq/replay\"><input type=\"hidden\" name=\"task\" value=\"\(Self.esc(id))\"><button class=\"replay\">Replay…</button></form></div>"
            }
        } catch {
            out += "<p class=\"bad\">\(Self.esc("\(error)"))</p>"
        }
        if out.isEmpty { out = "<p>No dead letter with task id \(Self.esc(id)).</p>" }
        return Self.page("Dead letter", out)
    }

    /// Replay or purge: a confirmation page first (what would happen), then the deed.
    func act(_ action: String, _ form: [String: String]) async -> String {
        let filter = self.filter(form)
        let what = ["reason", "queue", "task"].compactMap { key in form[key].flatMap { $0.isEmpty ? nil : "\(key) \($0)" } }.joined(separator: ", ")
        let scope = what.isEmpty ? "every dead letter" : "the dead letters with \(what)"
        guard form["confirm"] == "yes" else {
            var count = 0
            var summary: [String: Int] = [:]
            do {
                if action == "replay" {
                    let report = try await DeadLetterReplay.run(spec: self.api.spec, target: self.target, filter: filter, dryRun: true)
                    count = report.replayed
                    summary = report.skipped
                } else {
                    _ = try await DeadLetterReader(spec: self.api.spec, target: self.target).scan { _, letter in
                        if filter.matches(letter) { count += 1 }
                    }
                }
            } catch {
                return Self.page("Error", "<p class=\"bad\">\(Self.esc("\(error)"))</p>")
            }
            var out = "<div class=\"card\"><p id=\"confirm-text\">\(action == "replay" ? "Replay" : "Delete") \(count) of \(Self.esc(scope))?</p>"
            for (why, n) in summary.sorted(by: { $0.key < $1.key }) { out += "<p class=\"small\">\(n) stay: \(Self.esc(why))</p>" }
            out += "<form method=\"post\" action=\"/dashboard/dlq/\(action)\">\(Self.filterFields(form))<input type=\"hidden\" name=\"confirm\" value=\"yes\">"
            out += "<button id=\"confirm\" class=\"\(action == "purge" ? "danger" : "")\">Yes, \(action) \(count)</button> <a href=\"/dashboard/dlq\">Cancel</a></form></div>"
            return Self.page("Confirm", out)
        }
        var out = "<div class=\"card\" id=\"result\">"
        do {
            if action == "replay" {
                var problems: [String] = []
                let report = try await DeadLetterReplay.run(spec: self.api.spec, target: self.target, filter: filter, problem: { problems.append($0) })
                out += "<p>Replayed \(report.replayed) of \(report.total) dead letter(s)\(report.failed > 0 ? "; \(report.failed) could not be (they stay)" : "").</p>"
                for (why, n) in report.skipped.sorted(by: { $0.key < $1.key }) { out += "<p class=\"small\">\(n) stay: \(Self.esc(why))</p>" }
                for problem in problems.prefix(20) { out += "<p class=\"bad small\">\(Self.esc(problem))</p>" }
                self.logger.notice("dead letters replayed from the dashboard", metadata: ["scope": "\(scope)", "replayed": "\(report.replayed)"])
            } else {
                let remover = LetterRemover()
                var deleted = 0
                _ = try await DeadLetterReader(spec: self.api.spec, target: self.target).scan(remover: remover) { delivery, letter in
                    guard filter.matches(letter) else { return }
                    try remover.remove(delivery)
                    deleted += 1
                }
                out += "<p>Deleted \(deleted) dead letter(s).</p>"
                self.logger.notice("dead letters purged from the dashboard", metadata: ["scope": "\(scope)", "deleted": "\(deleted)"])
            }
        } catch {
            out += "<p class=\"bad\">\(Self.esc("\(error)"))</p>"
        }
        return Self.page("Done", out + "<p><a href=\"/dashboard/dlq\">Back to the dead letters</a> · <a href=\"/dashboard\">Dashboard</a></p></div>")
    }

    // MARK: HTML

    static func page(_ title: String, _ body: String, signedIn: Bool = true) -> String {
        """
        <!doctype html>
        <html lang="en"><head><meta charset="utf-8"><title>\(esc(title)) · AsyncQueue</title>
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <style>
        body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#f6f6f4}
        header{background:#223;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}
        header a{color:#cde}main{padding:8px 16px}section{margin-bottom:16px}
        table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
        th{background:#eee}.bad{color:#b00}.small{font-size:12px;color:#555}.card{background:#fff;padding:12px;border:1px solid #ddd;max-width:900px}
        .status.completed{color:#070}.status.failed{color:#b00}.status.retrying{color:#a60}form.inline{display:inline}
        button.danger{color:#b00}pre{background:#f0f0f0;padding:8px;overflow:auto;max-height:400px}h2{font-size:16px}
        </style></head><body>
        <header><b>AsyncQueue</b>\(signedIn ? "<a href=\"/dashboard\">Dashboard</a><a href=\"/dashboard/dlq\">Dead letters</a><form method=\"post\" action=\"/dashboard/logout\" class=\"inline\"><button>Sign out</button></form>" : "")</header>
        <main><h1>\(esc(title))</h1>
        \(body)
        </main></body></html>
        """
    }

    /// The one inline script's nonce. Fixed per process: the script is ours and constant, and a
    /// nonce only has to be unknown to whoever injects markup (no page echoes it to another).
    static let scriptNonce = GeneratedIds.next().replacingOccurrences(of: "-", with: "")

    /// No script but ours, no inline handlers, nothing from elsewhere, no framing.
    static let contentSecurityPolicy = "default-src 'none'; script-src 'nonce-\(scriptNonce)'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

    static func html(_ text: String, status: HTTPResponse.Status = .ok) -> Response {
        var headers: HTTPFields = [.contentType: "text/html; charset=utf-8", .cacheControl: "no-store"]
        headers[HTTPField.Name("Content-Security-Policy")!] = self.contentSecurityPolicy
        headers[HTTPField.Name("X-Content-Type-Options")!] = "nosniff"
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(string: text)))
    }

    /// HTML-escapes per Unicode scalar, not per Character: a quote followed by a combining mark
    /// is one Character that is not `"`, yet the browser still reads the quote.
    static func esc<S: StringProtocol>(_ text: S) -> String {
        var out = String.UnicodeScalarView()
        for scalar in text.unicodeScalars {
            switch scalar {
            case "&": out.append(contentsOf: "&amp;".unicodeScalars)
            case "<": out.append(contentsOf: "&lt;".unicodeScalars)
            case ">": out.append(contentsOf: "&gt;".unicodeScalars)
            case "\"": out.append(contentsOf: "&quot;".unicodeScalars)
            case "'": out.append(contentsOf: "&#39;".unicodeScalars)
            default: out.append(scalar)
            }
        }
        return String(out)
    }

    static func urlEscape(_ text: String) -> String {
        var allowed = CharacterSet.alphanumerics
        allowed.insert(charactersIn: "-._~:")
        return text.addingPercentEncoding(withAllowedCharacters: allowed) ?? text
    }

    /// A token as a cookie value: tokens are visible ASCII without ; , or spaces, else nothing.
    static func cookieSafe(_ token: String) -> String {
        token.unicodeScalars.allSatisfy { $0.value > 0x20 && $0.value < 0x7f && $0 != ";" && $0 != "," && $0 != "\"" && $0 != "\\" } ? token : ""
    }

    /// `HH:mm:ssZ` (UTC) of a Unix time in milliseconds (no formatter made per table row).
    static func time(_ milliseconds: Int64) -> String {
        let seconds = (milliseconds / 1000) % 86_400
        func two(_ n: Int64) -> String { n < 10 ? "0\(n)" : "\(n)" }
        return "\(two(seconds / 3600)):\(two(seconds / 60 % 60)):\(two(seconds % 60))Z"
    }

    static func query(_ request: Request) -> [String: String] {
        var out: [String: String] = [:]
        for (key, value) in request.uri.queryParameters { out[String(key)] = String(value) }
        return out
    }

    /// An `application/x-www-form-urlencoded` body (at most 64 KiB).
    static func form(_ request: Request) async throws -> [String: String] {
        let buffer = try await request.body.collect(upTo: 64 << 10)
        var out: [String: String] = [:]
        for pair in String(buffer: buffer).split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            func decode(_ s: Substring) -> String { (s.replacingOccurrences(of: "+", with: " ").removingPercentEncoding) ?? "" }
            out[decode(parts[0])] = parts.count > 1 ? decode(parts[1]) : ""
        }
        return out
    }
}
