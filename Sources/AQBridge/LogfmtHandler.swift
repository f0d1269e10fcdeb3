import Foundation
import Logging
import Synchronization

/// One line per event on standard error: `ts=… level=info msg="…" key=value …`.
/// Values are quoted when needed; nothing here ever receives a secret (URLs are logged without
/// credentials, signing secrets never).
public struct LogfmtHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level
    let label: String
    private static let lock = Mutex(())

    public init(label: String, level: Logger.Level = .info) {
        self.label = label
        self.logLevel = level
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.metadata[key] }
        set { self.metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var line = "ts=\(Self.timestamp()) level=\(event.level) msg=\(Self.quote(event.message.description))"
        var merged = self.metadata.merging(event.metadata ?? [:]) { $1 }
        if let error = event.error { merged["error"] = "\(error)" }
        for key in merged.keys.sorted() {
            line += " \(key)=\(Self.quote("\(merged[key].map { "\($0)" } ?? "")"))"
        }
        line += "\n"
        Self.lock.withLock { _ in FileHandle.standardError.write(Data(line.utf8)) }
    }

    /// UTC, ISO 8601 with milliseconds, without Foundation's formatters (they load ICU).
    static func timestamp() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var seconds = now.tv_sec
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
        let ms = now.tv_nsec / 1_000_000
        let milli = ms < 10 ? "00\(ms)" : ms < 100 ? "0\(ms)" : "\(ms)"
        return "\(parts.tm_year + 1900)-\(two(parts.tm_mon + 1))-\(two(parts.tm_mday))T\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec)).\(milli)Z"
    }

    /// A value as logfmt writes it: bare when it can be, else quoted with every control
    /// character, DEL, C1 control and Unicode line or paragraph separator escaped, so nothing a
    /// task sent (a CR in a URL, a forged "level=critical") can start a line of its own.
    static func quote(_ value: String) -> String {
        func needsEscape(_ scalar: Unicode.Scalar) -> Bool {
            scalar.value < 0x20 || (0x7F...0x9F).contains(scalar.value) || scalar.value == 0x2028 || scalar.value == 0x2029
        }
        let bare = !value.isEmpty && !value.unicodeScalars.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" || $0 == "\\" || needsEscape($0) })
        if bare { return value }
        var out = "\""
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case let s where needsEscape(s):
                let hex = String(s.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: max(0, 4 - hex.count)) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}
