import AMQPClient
import AQTopology
import ArgumentParser
import Foundation

extension AQCommand {
    struct Batch: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Look at batches (fan-out / fan-in) in the broker.",
            subcommands: [Status.self])
    }
}

extension AQCommand.Batch {
    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "How far a batch is, read from its checkpoint in the broker without disturbing it.",
            discussion: """
                Reads the batch's checkpoint (queue aq.batch.<id>.state) with basic.get and gives it back unacknowledged, \
                and counts the outcomes waiting in its reply queue (aq.batch.<id>.replies) that the aggregator has not \
                folded yet. Exit status: 0 the batch is open or ending, 1 no such batch (it ended and was cleaned up, or \
                never existed) or an error.
                """)

        @Argument(help: "The batch id.")
        var id: String
        @Flag(help: "Print JSON.")
        var json = false
        @OptionGroup var files: FileOptions
        @OptionGroup var broker: BrokerOptions

        /// The parts of the checkpoint (see AQBridge's BatchCheckpoint) this command shows.
        struct Checkpoint: Decodable {
            struct Manifest: Decodable {
                var id: String
                var size: Int
                var join: String
                var deadline: Int64?
                var createdAt: Int64
                var queue: String
                var webhookURL: String?
            }

            struct Bits: Decodable {
                var count: Int
                var bits: Data
                var population: Int { self.bits.reduce(0) { $0 + $1.nonzeroBitCount } }
            }

            var version: Int
            var manifest: Manifest
            var settled: Bits
            var failed: Bits
            var segments: Int
            var status: String?
        }

        func run() async throws {
            let spec = try self.files.load()
            let target = try self.broker.target()
            let base = spec.batchQueueName(forBatch: self.id)
            let connection = try await AMQPConnection.connect(configuration: target.amqp)
            var best: Checkpoint?
            var waiting: UInt32 = 0
            var consumers: UInt32 = 0
            do {
                let channel = try await connection.openChannel()
                // What the aggregator has not folded yet, and whether one is attached.
                let replies = try await channel.declareQueue(base + ".replies", passive: true)
                (waiting, consumers) = (replies.messageCount, replies.consumerCount)
                // Every checkpoint in the queue (a crash may leave two): the newest counts. They
                // are given back when the channel closes, unacknowledged. The aggregator reads its
                // checkpoint back for a moment when it writes a new one (and a bridge taking the
                // batch up reads it too), so an empty queue is read again for up to a second
                // before it counts as "no checkpoint yet".
                for attempt in 0..<40 where best == nil {
                    if attempt > 0 { try await Task.sleep(for: .milliseconds(25)) }
                    while let delivery = try await channel.get(base + ".state") {
                        if let checkpoint = try? JSONDecoder().decode(Checkpoint.self, from: Data(delivery.body)),
                           checkpoint.version >= (best?.version ?? -1) {
                            best = checkpoint
                        }
                    }
                }
                try await channel.close()
                await connection.close()
            } catch let error as AMQPError where error.replyCode == .notFound {
                await connection.close()
                printError("batch \(self.id): not found (it ended and its queues were deleted, or it never existed)")
                throw ExitCode.failure
            }
            guard let checkpoint = best else {
                printError("batch \(self.id): its queues exist but hold no checkpoint yet (being created?)")
                throw ExitCode.failure
            }
            let settled = checkpoint.settled.population, failed = checkpoint.failed.population
            let state = checkpoint.status.map { "ending (\($0)): its webhook is being sent" } ?? "open"
            if self.json {
                var object: [String: Any] = [
                    "batchId": checkpoint.manifest.id, "state": checkpoint.status == nil ? "open" : "ending", "join": checkpoint.manifest.join,
                    "size": checkpoint.manifest.size, "settled": settled, "completed": settled - failed, "failed": failed,
                    "notYetFolded": waiting, "aggregators": consumers, "checkpointVersion": checkpoint.version,
                    "createdAt": checkpoint.manifest.createdAt, "queue": checkpoint.manifest.queue,
                ]
                if let status = checkpoint.status { object["status"] = status }
                if let deadline = checkpoint.manifest.deadline { object["deadline"] = deadline }
                let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
                print(String(decoding: data, as: UTF8.self))
                return
            }
            func time(_ milliseconds: Int64) -> String {
                ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: Double(milliseconds) / 1000))
            }
            print("batch \(checkpoint.manifest.id): \(state), join \(checkpoint.manifest.join), work queue \(checkpoint.manifest.queue)")
            print("  children: \(checkpoint.manifest.size); settled \(settled) (completed \(settled - failed), failed \(failed)); \(waiting) outcome message(s) not yet folded")
            print("  created \(time(checkpoint.manifest.createdAt))" + (checkpoint.manifest.deadline.map { ", deadline \(time($0))" } ?? ", no deadline"))
            print("  aggregator attached: \(consumers > 0 ? "yes" : "no (the batch's timer brings one within 30 s)"); checkpoint version \(checkpoint.version)")
        }
    }
}
