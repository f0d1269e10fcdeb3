import AMQPClient
import AQHTTP
import Foundation

/// A task as published on the wire (the README's "Wire format").
public struct TaskSpec: Sendable, Equatable {
    public var id: String
    public var callbackURL: String
    /// The `payload` value's exact JSON bytes (`null` when absent), cut out of the message
    /// without a copy.
    public var payload: ArraySlice<UInt8>
    /// Where the outcome goes (every outcome, unless `failureWebhookURL` is set: then successes).
    public var webhookURL: String? {
        get {
            switch self.webhook {
            case .none: return nil
            case .text(let url): return url
            case .source(let body, let range): return try? JSONScan.decodeString(body, range)
            }
        }
        set { self.webhook = newValue.map { .text($0) } ?? .none }
    }
    /// As the task's message has it (its JSON string, read and checked once): the URL is needed
    /// only when the outcome is known, and a string made for each task held would cost it 80
    /// bytes of memory meanwhile. The body is the message's own, shared, not a copy.
    private var webhook: WebhookURL

    enum WebhookURL: Sendable {
        case none
        case text(String)
        case source([UInt8], Range<Int>)
    }
    public var retries: Int
    public var timeout: Duration
    /// Where a failure goes instead of `webhookURL`.
    public var failureWebhookURL: String? {
        get { self.rare?.fields.failureWebhookURL }
        set { self.updateRare { $0.failureWebhookURL = newValue } }
    }
    /// When the callback may run at the earliest.
    public var due: Due? {
        get { self.rare?.fields.due }
        set { self.updateRare { $0.due = newValue } }
    }
    /// A W3C trace context (`traceparent`), passed on to the callback and the webhook.
    public var traceparent: String? {
        get { self.rare?.fields.traceparent }
        set { self.updateRare { $0.traceparent = newValue } }
    }
    /// The three fields most tasks leave out, held apart: 8 bytes for all three instead of 56 in
    /// each task the bridge holds. Nil whenever all three are.
    private var rare: Rare?

    init(id: String, callbackURL: String, payload: ArraySlice<UInt8>, webhookURL: String?, failureWebhookURL: String?,
         retries: Int, timeout: Duration, due: Due?, traceparent: String?) {
        self.init(id: id, callbackURL: callbackURL, payload: payload, webhook: webhookURL.map { .text($0) } ?? .none,
                  failureWebhookURL: failureWebhookURL, retries: retries, timeout: timeout, due: due, traceparent: traceparent)
    }

    init(id: String, callbackURL: String, payload: ArraySlice<UInt8>, webhook: WebhookURL, failureWebhookURL: String?,
         retries: Int, timeout: Duration, due: Due?, traceparent: String?) {
        self.id = id
        self.callbackURL = callbackURL
        self.payload = payload
        self.webhook = webhook
        self.retries = retries
        self.timeout = timeout
        self.setRare(RareFields(failureWebhookURL: failureWebhookURL, due: due, traceparent: traceparent))
    }

    struct RareFields: Sendable, Equatable {
        var failureWebhookURL: String?
        var due: Due?
        var traceparent: String?
    }

    /// Immutable: a change makes a new one, so copies of a task never share a mutation.
    final class Rare: Sendable, Equatable {
        let fields: RareFields
        init(_ fields: RareFields) { self.fields = fields }
        static func == (a: Rare, b: Rare) -> Bool { a === b || a.fields == b.fields }
    }

    private mutating func updateRare(_ change: (inout RareFields) -> Void) {
        var fields = self.rare?.fields ?? RareFields()
        change(&fields)
        self.setRare(fields)
    }

    private mutating func setRare(_ fields: RareFields) {
        self.rare = fields == RareFields() ? nil : Rare(fields)
    }

    /// `delay` (seconds from when the task was published) or `notBefore` (a point in time).
    public enum Due: Sendable, Equatable {
        case after(Duration)
        case at(unixMilliseconds: Int64)
    }

    public static func == (a: TaskSpec, b: TaskSpec) -> Bool {
        a.id == b.id && a.callbackURL == b.callbackURL && a.payload == b.payload && a.webhookURL == b.webhookURL
            && a.retries == b.retries && a.timeout == b.timeout && a.rare == b.rare
    }

    /// The URL an outcome goes to.
    public func webhook(forFailure failure: Bool) -> String? {
        failure ? (self.failureWebhookURL ?? self.webhookURL) : self.webhookURL
    }
}

/// Why a message is not a task. It is dead-lettered with this reason, never retried; when its
/// webhook URLs could still be read, its publisher is told (`notify`).
public struct MalformedTask: Error, Sendable, Equatable, CustomStringConvertible {
    public var reason: String
    /// The failure webhook the body names, if it could be read and is a valid URL.
    public var notify: String?
    /// Not a task but a batch message (it has `batch` or `batchPart`): see ``BatchParser``.
    public var isBatch = false
    /// Not a task but a chain message (it has `chain`): see ``ChainParser``.
    public var isChain = false
    public var description: String { self.reason }

    public init(reason: String, notify: String? = nil, isBatch: Bool = false, isChain: Bool = false) {
        self.reason = reason
        self.notify = notify
        self.isBatch = isBatch
        self.isChain = isChain
    }
}

public struct TaskDefaults: Sendable {
    public var retries: Int
    public var timeout: Duration
    public var maxTimeout: Duration
    public var maxPayloadBytes: Int

    public init(retries: Int = 3, timeout: Duration = .seconds(30), maxTimeout: Duration = .seconds(1200), maxPayloadBytes: Int = 1 << 20) {
        self.retries = retries
        self.timeout = timeout
        self.maxTimeout = maxTimeout
        self.maxPayloadBytes = maxPayloadBytes
    }
}

public enum TaskParser {
    public static let maxRetries = 100
    /// The longest task id: the bridge derives longer ids from it (`<id>:result` for the webhook)
    /// that must still fit AMQP's 255-byte `message_id`.
    public static let maxIdBytes = 200

    /// The id when it can go into a header line and a `message_id` as it is: at most
    /// ``maxIdBytes`` bytes, no control characters (CR and LF among them), no line separators.
    public static func safeId(_ id: String?) -> String? {
        guard let id, !id.isEmpty, id.utf8.count <= Self.maxIdBytes,
              !id.unicodeScalars.contains(where: { $0.value < 0x20 || (0x7F...0x9F).contains($0.value) || $0.value == 0x2028 || $0.value == 0x2029 })
        else { return nil }
        return id
    }

    /// The longest `delay` (and the furthest `notBefore`): 30 days.
    public static let maxDelay = Duration.seconds(30 * 86_400)

    /// The keys of the wire format, in the order ``parse(_:messageId:defaults:)`` looks for them.
    static let keys: [StaticString] = ["callbackUrl", "payload", "webhookUrl", "failureWebhookUrl", "retries", "timeout", "taskId", "delay", "notBefore",
                                       "batch", "batchPart", "chain", "traceparent"]

    /// Reads and checks a task body. `messageId` is the AMQP `message_id` (the task id).
    /// `makeId` names a task that has neither a `message_id` nor a `taskId`.
    /// `range` is where the task is in `body` (a chain step is read inside its chain's message).
    /// `validated`: the range is part of a document read strictly already (nested values are
    /// then skipped by their structure; the strings the task is made of are still decoded strictly).
    public static func parse(_ body: [UInt8], in range: Range<Int>? = nil, validated: Bool = false, messageId: String?, defaults: TaskDefaults, now: Date = Date(),
                             makeId: () -> String = { UUID().uuidString.lowercased() }) -> Result<TaskSpec, MalformedTask> {
        let range = range ?? body.indices
        guard range.count <= defaults.maxPayloadBytes else {
            return .failure(MalformedTask(reason: "the task is \(range.count) bytes, over the limit of \(defaults.maxPayloadBytes)"))
        }
        // One pass; known keys are matched on their bytes (a key written with escapes is decoded).
        var members = [JSONScan.Member?](repeating: nil, count: Self.keys.count)
        do {
            try JSONScan.forEachMember(body, in: range, validated: validated) { (key: Range<Int>, member: JSONScan.Member) throws(JSONScan.Failure) in
                if let index = Self.keys.firstIndex(where: { JSONScan.keyEquals(body, key, $0) }) {
                    members[index] = member
                } else if body[key].contains(UInt8(ascii: "\\")) {
                    let decoded = try JSONScan.decodeString(body, key)
                    if let index = Self.keys.firstIndex(where: { $0.description == decoded }) { members[index] = member }
                }
            }
        } catch {
            return .failure(MalformedTask(reason: "the body is not a JSON object: \(error)"))
        }
        if members[9] != nil || members[10] != nil {
            return .failure(MalformedTask(reason: "a batch message (batch or batchPart), not a task", isBatch: true))
        }
        if members[11] != nil {
            return .failure(MalformedTask(reason: "a chain message, not a task", isChain: true))
        }
        let (callbackMember, payloadMember, webhookMember, failureMember) = (members[0], members[1], members[2], members[3])
        let (retriesMember, timeoutMember, taskIdMember, delayMember, notBeforeMember) = (members[4], members[5], members[6], members[7], members[8])
        func string(_ member: JSONScan.Member?, _ key: String) -> Result<String?, MalformedTask> {
            guard let member else { return .success(nil) }
            switch member.kind {
            case .null: return .success(nil)
            case .string:
                do { return .success(try JSONScan.decodeString(body, member.range)) } catch {
                    return .failure(MalformedTask(reason: "\(key): \(error)"))
                }
            default: return .failure(MalformedTask(reason: "\(key) must be a string, not \(member.kind)"))
            }
        }
        // Where a failure is reported, read first and leniently: a task malformed elsewhere is
        // still told about it when this much is readable.
        func url(_ member: JSONScan.Member?, _ key: String) -> Result<String?, MalformedTask> {
            switch string(member, key) {
            case .failure(let error): return .failure(error)
            case .success(nil): return .success(nil)
            case .success(let url?): return Self.urlProblem(url).map { .failure(MalformedTask(reason: "\(key) \($0)")) } ?? .success(url)
            }
        }
        let webhookResult = url(webhookMember, "webhookUrl"), failureResult = url(failureMember, "failureWebhookUrl")
        let notify = (try? failureResult.get()) ?? (try? webhookResult.get()) ?? nil
        func bad(_ reason: String) -> Result<TaskSpec, MalformedTask> { .failure(MalformedTask(reason: reason, notify: notify)) }
        func bad(_ error: MalformedTask) -> Result<TaskSpec, MalformedTask> { bad(error.reason) }

        let callback: String
        switch string(callbackMember, "callbackUrl") {
        case .failure(let error): return bad(error)
        case .success(nil): return bad("callbackUrl is missing")
        case .success(let url?): callback = url
        }
        if let problem = Self.urlProblem(callback) { return bad("callbackUrl \(problem)") }
        let webhook: TaskSpec.WebhookURL, failureWebhook: String?
        switch (webhookResult, failureResult) {
        case (.failure(let error), _), (_, .failure(let error)): return bad(error)
        case (.success(let w), .success(let f)):
            // Checked: kept as the message has it (see TaskSpec.webhookURL).
            if w != nil, let member = webhookMember, member.kind == .string { webhook = .source(body, member.range) } else { webhook = w.map { .text($0) } ?? .none }
            failureWebhook = f
        }
        var retries = defaults.retries
        if let member = retriesMember, member.kind != .null {
            let text = String(decoding: body[member.range], as: UTF8.self)
            guard member.kind == .number, let value = Int(text), (0...Self.maxRetries).contains(value) else {
                return bad("retries must be a whole number from 0 to \(Self.maxRetries), not \(text)")
            }
            retries = value
        }
        var timeout = defaults.timeout
        if let member = timeoutMember, member.kind != .null {
            let text = String(decoding: body[member.range], as: UTF8.self)
            guard member.kind == .number, let seconds = Double(text), seconds.isFinite, seconds > 0 else {
                return bad("timeout must be a positive number of seconds, not \(text)")
            }
            let limit = Double(defaults.maxTimeout.components.seconds) + Double(defaults.maxTimeout.components.attoseconds) / 1e18
            guard seconds <= limit else {
                return bad("timeout \(text)s is over the bridge's limit of \(defaults.maxTimeout.components.seconds)s (it must stay under the broker's consumer_timeout)")
            }
            timeout = max(Duration.milliseconds(Int64((seconds * 1000).rounded())), .milliseconds(1))
        }
        var due: TaskSpec.Due?
        let maxDelaySeconds = Double(Self.maxDelay.components.seconds)
        if let member = delayMember, member.kind != .null {
            let text = String(decoding: body[member.range], as: UTF8.self)
            guard member.kind == .number, let seconds = Double(text), seconds.isFinite, seconds >= 0, seconds <= maxDelaySeconds else {
                return bad("delay must be a number of seconds from 0 to \(Int(maxDelaySeconds)) (30 days), not \(text.prefix(40))")
            }
            due = .after(.milliseconds(Int64((seconds * 1000).rounded())))
        }
        if let member = notBeforeMember, member.kind != .null {
            guard due == nil else { return bad("give delay or notBefore, not both") }
            let text = String(decoding: body[member.range], as: UTF8.self)
            var milliseconds: Int64?
            if member.kind == .number, let seconds = Double(text), seconds.isFinite, seconds >= 0, seconds < 1e11 {
                milliseconds = Int64((seconds * 1000).rounded())
            } else if member.kind == .string, let value = try? JSONScan.decodeString(body, member.range) {
                milliseconds = RFC3339.unixMilliseconds(value)
            }
            guard let milliseconds else {
                return bad("notBefore must be Unix seconds or an RFC 3339 time such as 2026-12-01T12:00:00Z, not \(text.prefix(40))")
            }
            let latest = Int64((now.timeIntervalSince1970 + Double(Self.maxDelay.components.seconds)) * 1000)
            guard milliseconds <= latest else { return bad("notBefore is more than 30 days ahead") }
            due = .at(unixMilliseconds: milliseconds)
        }
        let payload = payloadMember.map { body[$0.range] } ?? Array("null".utf8)[...]
        var id = messageId ?? ""
        if id.isEmpty, case .success(let bodyId?) = string(taskIdMember, "taskId") { id = bodyId }
        if id.isEmpty { id = makeId() }
        guard Self.safeId(id) != nil else {
            return bad("the task id (message_id or taskId) must be at most \(Self.maxIdBytes) bytes without control characters")
        }
        // A traceparent that is not W3C's is ignored, as the spec says (never a reason to refuse).
        let traceparent = members[12].flatMap { try? string($0, "traceparent").get() }.flatMap(Self.validTraceparent)
        return .success(TaskSpec(id: id, callbackURL: callback, payload: payload, webhook: webhook, failureWebhookURL: failureWebhook,
                                 retries: retries, timeout: timeout, due: due, traceparent: traceparent))
    }

    /// `value` if it is a W3C `traceparent` (version 00: `00-<32 hex trace id>-<16 hex parent
    /// id>-<2 hex flags>`, lower case, ids not all zeros), else nil.
    public static func validTraceparent(_ value: String) -> String? {
        let bytes = Array(value.utf8)
        guard bytes.count == 55, bytes[2] == UInt8(ascii: "-"), bytes[35] == UInt8(ascii: "-"), bytes[52] == UInt8(ascii: "-") else { return nil }
        func hex(_ range: Range<Int>) -> Bool {
            bytes[range].allSatisfy { (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) || (UInt8(ascii: "a")...UInt8(ascii: "f")).contains($0) }
        }
        func zeros(_ range: Range<Int>) -> Bool { bytes[range].allSatisfy { $0 == UInt8(ascii: "0") } }
        guard hex(0..<2), hex(3..<35), hex(36..<52), hex(53..<55), bytes[0] == UInt8(ascii: "0"), bytes[1] == UInt8(ascii: "0"),
              !zeros(3..<35), !zeros(36..<52) else { return nil }
        return value
    }

    /// Cheap checks; libcurl rejects the rest (and the task then fails as not retryable).
    static func urlProblem(_ url: String) -> String? {
        var url = url
        return url.withUTF8 { bytes -> String? in
            func lower(_ b: UInt8) -> UInt8 { b >= 0x41 && b <= 0x5A ? b | 0x20 : b }
            func hasPrefix(_ p: StaticString) -> Bool {
                guard bytes.count >= p.utf8CodeUnitCount else { return false }
                for i in 0..<p.utf8CodeUnitCount where lower(bytes[i]) != p.utf8Start[i] { return false }
                return true
            }
            let hostStart: Int
            if hasPrefix("http://") { hostStart = 7 } else if hasPrefix("https://") { hostStart = 8 } else {
                return "must be an http or https URL, not '\(URLText.redacted(String(decoding: bytes.prefix(16384), as: UTF8.self), limit: 80))'"
            }
            if bytes.count > 8192 { return "is longer than 8192 bytes" }
            var hostLength = 0
            var index = hostStart
            while index < bytes.count, bytes[index] != UInt8(ascii: "/"), bytes[index] != UInt8(ascii: "?"), bytes[index] != UInt8(ascii: "#") {
                index += 1
                hostLength += 1
            }
            if hostLength == 0 || bytes[hostStart] == UInt8(ascii: ":") {
                return "has no host: '\(URLText.redacted(String(decoding: bytes.prefix(16384), as: UTF8.self), limit: 80))'"
            }
            for byte in bytes where byte <= 0x20 || byte == 0x7F { return "contains spaces or control characters" }
            if !URLText.hasValidAuthority(bytes) {
                let text = String(decoding: bytes, as: UTF8.self)
                return "has a host or port that is not plain ASCII letters, digits, '-', '.' and '_' (or an IP address; write an IDN as punycode, not percent-encoded): '\(URLText.redacted(text, limit: 80))'"
            }
            return nil
        }
    }
}

/// RFC 3339 times (`2026-12-01T12:00:00Z`, `2026-12-01T12:00:00.250+01:00`) without Foundation's
/// ICU-backed formatters. Pure.
enum RFC3339 {
    static func unixMilliseconds(_ text: String) -> Int64? {
        let b = Array(text.utf8)
        func digits(_ range: Range<Int>) -> Int? {
            guard range.upperBound <= b.count else { return nil }
            var value = 0
            for i in range {
                guard b[i] >= 0x30, b[i] <= 0x39 else { return nil }
                value = value * 10 + Int(b[i] - 0x30)
            }
            return value
        }
        guard b.count >= 20, b[4] == UInt8(ascii: "-"), b[7] == UInt8(ascii: "-"), b[10] | 0x20 == UInt8(ascii: "t"),
              b[13] == UInt8(ascii: ":"), b[16] == UInt8(ascii: ":"),
              let year = digits(0..<4), let month = digits(5..<7), let day = digits(8..<10),
              let hour = digits(11..<13), let minute = digits(14..<16), let second = digits(17..<19),
              (1...12).contains(month), (1...31).contains(day), hour < 24, minute < 60, second < 61
        else { return nil }
        var index = 19
        var milliseconds = 0
        if index < b.count, b[index] == UInt8(ascii: ".") {
            index += 1
            var scale = 100
            let start = index
            while index < b.count, b[index] >= 0x30, b[index] <= 0x39 {
                milliseconds += Int(b[index] - 0x30) * scale
                scale /= 10
                index += 1
            }
            guard index > start else { return nil }
        }
        var offset = 0
        guard index < b.count else { return nil }
        if b[index] | 0x20 == UInt8(ascii: "z"), index + 1 == b.count {
            offset = 0
        } else if b[index] == UInt8(ascii: "+") || b[index] == UInt8(ascii: "-"), index + 6 == b.count, b[index + 3] == UInt8(ascii: ":"),
                  let h = digits((index + 1)..<(index + 3)), let m = digits((index + 4)..<(index + 6)), h < 24, m < 60 {
            offset = (h * 60 + m) * 60 * (b[index] == UInt8(ascii: "+") ? 1 : -1)
        } else {
            return nil
        }
        // Days from the civil date (Howard Hinnant's algorithm), then seconds.
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let doy = (153 * (month + (month > 2 ? -3 : 9)) + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        let days = era * 146_097 + doe - 719_468
        let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset
        return Int64(seconds) * 1000 + Int64(milliseconds)
    }
}
