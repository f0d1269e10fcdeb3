import AMQPClient
import AQHTTP
import Foundation

/// A task as published on the wire (the README's "Wire format").
public struct TaskSpec: Sendable, Equatable {
    public var id: String
    public var callbackURL: String
    /// The `payload` value's exact JSON bytes (`null` when absent).
    public var payload: [UInt8]
    public var webhookURL: String?
    public var retries: Int
    public var timeout: Duration
}

/// Why a message is not a task. It is dead-lettered with this reason, never retried.
public struct MalformedTask: Error, Sendable, Equatable, CustomStringConvertible {
    public var reason: String
    public var description: String { self.reason }
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

    /// Reads and checks a task body. `messageId` is the AMQP `message_id` (the task id).
    public static func parse(_ body: [UInt8], messageId: String?, defaults: TaskDefaults) -> Result<TaskSpec, MalformedTask> {
        func bad(_ reason: String) -> Result<TaskSpec, MalformedTask> { .failure(MalformedTask(reason: reason)) }
        guard body.count <= defaults.maxPayloadBytes else {
            return bad("the task is \(body.count) bytes, over the limit of \(defaults.maxPayloadBytes)")
        }
        // One pass; known keys are matched on their bytes (a key written with escapes is decoded).
        var callbackMember, payloadMember, webhookMember, retriesMember, timeoutMember, taskIdMember: JSONScan.Member?
        do {
            try JSONScan.forEachMember(body) { (key: Range<Int>, member: JSONScan.Member) throws(JSONScan.Failure) in
                if JSONScan.keyEquals(body, key, "callbackUrl") { callbackMember = member }
                else if JSONScan.keyEquals(body, key, "payload") { payloadMember = member }
                else if JSONScan.keyEquals(body, key, "webhookUrl") { webhookMember = member }
                else if JSONScan.keyEquals(body, key, "retries") { retriesMember = member }
                else if JSONScan.keyEquals(body, key, "timeout") { timeoutMember = member }
                else if JSONScan.keyEquals(body, key, "taskId") { taskIdMember = member }
                else if body[key].contains(UInt8(ascii: "\\")) {
                    switch try JSONScan.decodeString(body, key) {
                    case "callbackUrl": callbackMember = member
                    case "payload": payloadMember = member
                    case "webhookUrl": webhookMember = member
                    case "retries": retriesMember = member
                    case "timeout": timeoutMember = member
                    case "taskId": taskIdMember = member
                    default: break
                    }
                }
            }
        } catch {
            return bad("the body is not a JSON object: \(error)")
        }
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
        let callback: String
        switch string(callbackMember, "callbackUrl") {
        case .failure(let error): return .failure(error)
        case .success(nil): return bad("callbackUrl is missing")
        case .success(let url?): callback = url
        }
        if let problem = Self.urlProblem(callback) { return bad("callbackUrl \(problem)") }
        var webhook: String?
        switch string(webhookMember, "webhookUrl") {
        case .failure(let error): return .failure(error)
        case .success(let url):
            webhook = url
            if let url, let problem = Self.urlProblem(url) { return bad("webhookUrl \(problem)") }
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
        let payload = payloadMember.map { Array(body[$0.range]) } ?? Array("null".utf8)
        var id = messageId ?? ""
        if id.isEmpty, case .success(let bodyId?) = string(taskIdMember, "taskId") { id = bodyId }
        if id.isEmpty { id = UUID().uuidString.lowercased() }
        guard Self.safeId(id) != nil else {
            return bad("the task id (message_id or taskId) must be at most \(Self.maxIdBytes) bytes without control characters")
        }
        return .success(TaskSpec(id: id, callbackURL: callback, payload: payload, webhookURL: webhook, retries: retries, timeout: timeout))
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
            return nil
        }
    }
}
