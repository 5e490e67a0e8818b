"""Checks the rules of deploy/kubernetes/ that schemas cannot express: what the broker's
deployment needs to scale out safely and to run locked down. Usage: k8s-policy.py FILE..."""

import sys

import yaml

NAME = "giroident-broker"


def load(paths):
    resources = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    resources.setdefault(doc["kind"], []).append(doc)
    return resources


def env_value(container, name):
    for item in container.get("env", []):
        if item["name"] == name:
            return item.get("value")
    return None


def peer_is_narrow(peer):
    """A NetworkPolicy peer that names a namespace (by labels) or an address block."""
    if "ipBlock" in peer:
        return set(peer) == {"ipBlock"} and bool(peer["ipBlock"].get("cidr"))
    return set(peer) <= {"namespaceSelector", "podSelector"} and bool(
        peer.get("namespaceSelector", {}).get("matchLabels"))


def secret_files(pod, container):
    """Files the container reads from the Secret: {path: key}, for read-only mounts only."""
    volumes = {v["name"]: v["secret"] for v in pod.get("volumes", []) if "secret" in v}
    files = {}
    for mount in container.get("volumeMounts", []):
        source = volumes.get(mount["name"])
        if source is None or source.get("secretName") != NAME or not mount.get("readOnly"):
            continue
        for item in source.get("items", []):
            files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = item["key"]
    return files


def check(resources):
    problems = []

    def need(condition, message):
        if not condition:
            problems.append(message)

    def one(kind):
        found = resources.get(kind, [])
        need(len(found) == 1, f"exactly one {kind} expected, found {len(found)}")
        return found[0] if found else None

    deployment = one("Deployment")
    service = one("Service")
    hpa = one("HorizontalPodAutoscaler")
    pdb = one("PodDisruptionBudget")
    policy = one("NetworkPolicy")
    secret = one("Secret")
    if None in (deployment, service, hpa, pdb, policy, secret):
        return problems

    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    selector = spec["selector"]["matchLabels"]
    need(spec.get("replicas", 1) >= 2, "Deployment: at least 2 replicas")
    need(selector.items() <= labels.items(), "Deployment: selector must match the pod labels")
    for kind, sel in (
        ("Service", service["spec"]["selector"]),
        ("PodDisruptionBudget", pdb["spec"]["selector"]["matchLabels"]),
        ("NetworkPolicy", policy["spec"]["podSelector"]["matchLabels"]),
    ):
        need(sel and sel.items() <= labels.items(), f"{kind}: selector must match the pods")

    pod_sc = pod.get("securityContext", {})
    need(pod_sc.get("runAsNonRoot") is True, "pod: runAsNonRoot")
    need(pod_sc.get("runAsUser", 0) != 0, "pod: runAsUser must not be 0")
    need(pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
         "pod: seccompProfile RuntimeDefault")
    (container,) = pod["containers"]
    sc = container.get("securityContext", {})
    need(sc.get("readOnlyRootFilesystem") is True, "container: readOnlyRootFilesystem")
    need(sc.get("allowPrivilegeEscalation") is False, "container: allowPrivilegeEscalation false")
    need(sc.get("capabilities", {}).get("drop") == ["ALL"], "container: drop ALL capabilities")
    need(not sc.get("capabilities", {}).get("add"), "container: no added capabilities")
    resources_ = container.get("resources", {})
    for part in ("requests", "limits"):
        for res in ("cpu", "memory"):
            need(res in resources_.get(part, {}), f"container: resources.{part}.{res}")
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        need(container.get(probe, {}).get("httpGet", {}).get("path") == path,
             f"container: {probe} on {path}")

    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    listen = env_value(container, "GIROIDENT_BROKER_SERVER__LISTEN") or ""
    need(listen.startswith("0.0.0.0:"), "container: GIROIDENT_BROKER_SERVER__LISTEN on 0.0.0.0")
    need(listen.endswith(f":{ports.get('http')}"), "container: listens on the http port")
    for p in service["spec"]["ports"]:
        need(p["targetPort"] in ports or p["targetPort"] in ports.values(),
             f"Service: targetPort {p['targetPort']} is no container port")

    drain = int(env_value(container, "GIROIDENT_BROKER_SERVER__DRAIN_SECS") or 5)
    request_timeout = int(env_value(container, "GIROIDENT_BROKER_SERVER__REQUEST_TIMEOUT_SECS") or 30)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    need(grace > drain + request_timeout,
         f"pod: terminationGracePeriodSeconds {grace} must exceed drain {drain} s "
         f"+ request timeout {request_timeout} s")
    readiness = container["readinessProbe"]
    need(readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3) < drain,
         "readinessProbe must fail within the drain period")

    target = hpa["spec"]["scaleTargetRef"]
    need(hpa["apiVersion"] == "autoscaling/v2", "HorizontalPodAutoscaler: autoscaling/v2")
    need(target["kind"] == "Deployment" and target["name"] == deployment["metadata"]["name"],
         "HorizontalPodAutoscaler: must scale the Deployment")
    need(hpa["spec"].get("minReplicas", 1) >= 2, "HorizontalPodAutoscaler: minReplicas >= 2")

    need(set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"},
         "NetworkPolicy: both Ingress and Egress")
    for rule in policy["spec"].get("ingress", []):
        for peer in rule.get("from", []):
            need(set(peer) == {"namespaceSelector"} and peer["namespaceSelector"].get("matchLabels"),
                 "NetworkPolicy: ingress only from a named namespace")
    egress = policy["spec"].get("egress", [])
    egress_ports = {(p.get("protocol", "TCP"), p["port"])
                    for rule in egress for p in rule.get("ports", [])}
    need(egress_ports and egress_ports <= {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 5432)},
         f"NetworkPolicy: egress only DNS, HTTPS and PostgreSQL, found {sorted(egress_ports)}")
    need(all(rule.get("ports") for rule in egress),
         "NetworkPolicy: every egress rule names its ports")
    need(("TCP", 5432) in egress_ports, "NetworkPolicy: egress to PostgreSQL (TCP 5432), the ledger")
    for rule in egress:
        if any(p["port"] == 5432 for p in rule.get("ports", [])):
            # PostgreSQL only to the database: a named namespace or an address, never anywhere,
            # and not mixed with finAPI's HTTPS.
            peers = rule.get("to", [])
            need(peers and all(peer_is_narrow(peer) for peer in peers),
                 "NetworkPolicy: PostgreSQL egress only to a named namespace or an ipBlock")
            need({p["port"] for p in rule["ports"]} == {5432},
                 "NetworkPolicy: the PostgreSQL rule admits port 5432 only")

    # Several replicas share one ledger: its URL comes from the Secret (a postgres:// URL holds
    # its password), never the image's default SQLite file, and so does the password key.
    need(not env_value(container, "GIROIDENT_BROKER_IDENTITIES__DATABASE_URL"),
         "container: the database URL holds a password: use GIROIDENT_BROKER_IDENTITIES__DATABASE_URL_FILE")
    need(not env_value(container, "GIROIDENT_BROKER_IDENTITIES__PASSWORD_KEY"),
         "container: the password key is a secret: use GIROIDENT_BROKER_IDENTITIES__PASSWORD_KEY_FILE")
    mounted = secret_files(pod, container)
    secret_keys = {**secret.get("stringData", {}), **secret.get("data", {})}
    for var, key in (("GIROIDENT_BROKER_IDENTITIES__DATABASE_URL_FILE", "database_url"),
                     ("GIROIDENT_BROKER_IDENTITIES__PASSWORD_KEY_FILE", "identity_password_key")):
        path = env_value(container, var)
        need(path is not None, f"container: {var} must be set (the broker refuses to start without it)")
        if path is not None:
            need(mounted.get(path) == key, f"container: {var} must be the Secret's key {key}, mounted read-only")
        need(key in secret_keys, f"Secret: needs the key {key}")
    for path, key in mounted.items():
        need(key in secret_keys, f"Secret: the Deployment mounts {key}, which the Secret lacks")

    for key, value in {**secret.get("stringData", {}), **secret.get("data", {})}.items():
        need(str(value).startswith("REPLACE_"), f"Secret: {key} must be a REPLACE_ placeholder")
    return problems


def main(paths):
    problems = check(load(paths))
    for problem in problems:
        print(f"ERROR {problem}")
    if problems:
        return 1
    print(f"INFO {len(paths)} manifests follow the deployment rules")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
