// Readiness check for deploy/tools/kafka: waits until each given node answers a metadata
// request that lists at least the expected number of brokers.
//
//   java -cp classes:libs/* ClusterCheck TIMEOUT_SECS EXPECTED_BROKERS HOST:PORT...
//
// Exit 0 when every node did within the time; 1 with the last reason on stderr otherwise.

import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;

public final class ClusterCheck {
    public static void main(String[] args) throws Exception {
        if (args.length < 3) {
            System.err.println("usage: ClusterCheck TIMEOUT_SECS EXPECTED_BROKERS HOST:PORT...");
            System.exit(2);
        }
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[0]));
        int expected = Integer.parseInt(args[1]);
        for (int i = 2; i < args.length; i++) {
            String address = args[i];
            String last = "no answer";
            boolean ready = false;
            Properties props = new Properties();
            props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, address);
            props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "2000");
            props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "3000");
            props.put(AdminClientConfig.RECONNECT_BACKOFF_MAX_MS_CONFIG, "250");
            try (Admin admin = Admin.create(props)) {
                while (!ready && System.nanoTime() < deadline) {
                    try {
                        int nodes = admin.describeCluster().nodes().get(3, TimeUnit.SECONDS).size();
                        if (nodes >= expected) {
                            ready = true;
                        } else {
                            last = nodes + " of " + expected + " brokers in its metadata";
                            Thread.sleep(250);
                        }
                    } catch (Exception e) {
                        last = e.getCause() != null ? e.getCause().toString() : e.toString();
                        Thread.sleep(250);
                    }
                }
            }
            if (!ready) {
                System.err.println(address + " is not ready: " + last);
                System.exit(1);
            }
        }
    }
}
