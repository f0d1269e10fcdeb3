import AQHTTP
import AQTopology
import Foundation

/// What one HTTP attempt came to.
public enum AttemptOutcome: Sendable, Equatable {
    case success(status: Int)
    /// Worth another attempt; `retryAfter` when the server said when.
    case retryable(reason: String, status: Int?, retryAfter: Duration?)
    /// Retrying cannot fix it.
    case permanent(reason: String, status: Int?)

    public var status: Int? {
        switch self {
        case .success(let s): return s
        case .retryable(_, let s, _), .permanent(_, let s): return s
        }
    }
    public var reason: String {
        switch self {
        case .success(let s): return "HTTP \(s)"
        case .retryable(let r, _, _), .permanent(let r, _): return r
        }
    }
}

/// Which answers are retried, and how long a retry waits.
public enum RetryPolicy {
    /// - 2xx: success.
    /// - `AsyncQueue-No-Retry: true` on any other answer: fails at once.
    /// - 408, 425, 429 and 5xx except 501 and 505: retried (`Retry-After` honoured).
    /// - every other status (3xx, most 4xx, 501, 505): fails at once.
    /// - no answer (refused, reset, DNS, TLS, timeout): retried; an answer over the size limit or
    ///   a URL libcurl refuses: fails at once.
    public static func classify(_ result: Result<HTTPAnswer, HTTPError>, timeout: Duration) -> AttemptOutcome {
        switch result {
        case .failure(let error):
            switch error.kind {
            case .timeout: return .retryable(reason: "no answer within \(Self.seconds(timeout))", status: nil, retryAfter: nil)
            case .tooLarge: return .permanent(reason: error.message, status: nil)
            case .invalidURL: return .permanent(reason: "the URL was refused: \(error.message)", status: nil)
            case .refused: return .permanent(reason: "the URL is not allowed: \(error.message)", status: nil)
            case .invalidRequest: return .permanent(reason: "the request cannot be sent: \(error.message)", status: nil)
            case .couldNotResolve: return .retryable(reason: "DNS lookup failed: \(error.message)", status: nil, retryAfter: nil)
            case .couldNotConnect: return .retryable(reason: "could not connect: \(error.message)", status: nil, retryAfter: nil)
            case .tls: return .retryable(reason: "TLS failed: \(error.message)", status: nil, retryAfter: nil)
            case .other: return .retryable(reason: error.message, status: nil, retryAfter: nil)
            }
        case .success(let answer):
            let status = answer.status
            if (200..<300).contains(status) { return .success(status: status) }
            if let noRetry = answer.noRetry?.lowercased(), noRetry == "true" || noRetry == "1" {
                return .permanent(reason: "HTTP \(status) with AsyncQueue-No-Retry", status: status)
            }
            switch status {
            case 408, 425, 429, 500, 502, 503, 504, 506...599:
                return .retryable(reason: "HTTP \(status)", status: status, retryAfter: answer.retryAfter.flatMap(Self.parseRetryAfter))
            default:
                return .permanent(reason: "HTTP \(status)", status: status)
            }
        }
    }

    static func seconds(_ d: Duration) -> String {
        let ms = d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000
        return ms % 1000 == 0 ? "\(ms / 1000)s" : "\(Double(ms) / 1000)s"
    }

    /// The longest wait a `Retry-After` can ask for; longer asks are cut to it.
    public static let maxRetryAfter = Duration.seconds(86_400)

    /// `Retry-After`: delta-seconds or an HTTP date, at most ``maxRetryAfter`` (an outside number
    /// never reaches arithmetic that could trap).
    public static func parseRetryAfter(_ value: String) -> Duration? {
        let trimmed = value.trimmingCharacters(in: .whitespaces)
        if !trimmed.isEmpty, trimmed.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) {
            // Any run of digits, however long: too large for Int means "very long".
            guard trimmed.utf8.count <= 9, let seconds = Int(trimmed) else { return Self.maxRetryAfter }
            return min(.seconds(seconds), Self.maxRetryAfter)
        }
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
        guard let date = formatter.date(from: trimmed) else { return nil }
        let seconds = date.timeIntervalSinceNow.rounded(.up)
        guard seconds.isFinite, seconds > 0 else { return .zero }
        return seconds >= 86_400 ? Self.maxRetryAfter : .seconds(Int(seconds))
    }

    /// The delay tier for retry number `retry` (1 = the first retry): tiers in order, the last
    /// repeating. Jitter: one retry in four waits one tier longer, so a burst of failures does not
    /// come back as a burst. With `retryAfter`, the shortest tier at least that long.
    public static func tier(forRetry retry: Int, retryAfter: Duration?, tiers: [TimeSpan], jitter: Bool = true) -> TimeSpan? {
        guard !tiers.isEmpty else { return nil }
        if let retryAfter {
            let seconds = min(max(retryAfter, .zero), Self.maxRetryAfter).components.seconds
            let ms = seconds * 1000
            return tiers.first { $0.milliseconds >= ms } ?? tiers.last
        }
        var index = min(max(retry, 1), tiers.count) - 1
        if jitter, index + 1 < tiers.count, Int.random(in: 0..<4) == 0 { index += 1 }
        return tiers[index]
    }
}
