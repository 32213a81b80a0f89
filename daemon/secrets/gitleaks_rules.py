"""Vendor token rules ported from gitleaks' default configuration.

Source: gitleaks (https://github.com/gitleaks/gitleaks, MIT licence, Copyright (c) 2019
Zachary Rice), ``config/gitleaks.toml`` and ``cmd/generate/config/rules/*.go`` as of v8.30.
Patterns, keywords, entropy thresholds, path conditions and allowlists are carried over
unchanged apart from the Go-to-Python regex translation done by ``regex.go``, with three
deliberate differences: the path-only ``pkcs12-file`` rule is left out (binary files are not
scanned); capture groups that would make a token's prefix its "secret" are non-capturing
(``jwt-base64``, ``microsoft-teams-webhook``, ``sonar-api-token`` reads its value group); and
a private key body is bounded at 64 KiB, since Python's backtracking engine, unlike RE2, is
not linear in the length of an unterminated block.
"""

# ruff: noqa: E501 -- one rule a line reads better than wrapped patterns

from __future__ import annotations

from daemon.secrets.regex import compile_go
from daemon.secrets.regex import semi_generic as semi
from daemon.secrets.regex import unique_token as uniq
from daemon.secrets.rules import Allow, Rule, allow, rule
from daemon.secrets.stopwords import GENERIC_STOPWORDS

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_NEW_RELIC = ["new-relic", "newrelic", "new_relic"]
_JFROG = ["jfrog", "artifactory", "bintray", "xray"]
_SUMO = ["(?-i:[Ss]umo|SUMO)"]


def _alnum(n: str) -> str:
    return f"[a-z0-9]{{{n}}}"


def _hex(n: str) -> str:
    return f"[a-f0-9]{{{n}}}"


def _ext(n: str) -> str:
    return rf"[a-z0-9=_\-]{{{n}}}"


def _vendor(
    rule_id: str, names: list[str], secret: str, keywords: str = "", *, entropy: float = 0.0
) -> Rule:
    """The common shape: a vendor name assigned a value of a known format."""
    return rule(rule_id, semi(names, secret), keywords or ",".join(names), entropy=entropy)


GLOBAL_ALLOW: tuple[Allow, ...] = (
    allow(
        r"(?i)^true|false|null$",
        r"^(?i:a+|b+|c+|d+|e+|f+|g+|h+|i+|j+|k+|l+|m+|n+|o+|p+|q+|r+|s+|t+|u+|v+|w+|x+|y+|z+|\*+|\.+)$",
        r"^\$(?:\d+|{\d+})$",
        r"^\$(?:[A-Z_]+|[a-z_]+)$",
        r"^\${(?:[A-Z_]+|[a-z_]+)}$",
        r"^\{\{[ \t]*[\w ().|]+[ \t]*}}$",
        r"^\$\{\{[ \t]*(?:(?:env|github|secrets|vars)(?:\.[A-Za-z]\w+)+[\w \"'&./=|]*)[ \t]*}}$",
        r"^%(?:[A-Z_]+|[a-z_]+)%$",
        r"^%[+\-# 0]?[bcdeEfFgGoOpqstTUvxX]$",
        r"^\{\d{0,2}}$",
        r"^@(?:[A-Z_]+|[a-z_]+)@$",
        r"^/Users/(?i)[a-z0-9]+/[\w .-/]+$",
        r"^/(?:bin|etc|home|opt|tmp|usr|var)/[\w ./-]+$",
        stopwords=["014df517-39d1-4453-b7b3-9930c563627c", "abcdefghijklmnopqrstuvwxyz"],
    ),
)

_GENERIC_MATCH_ALLOW = (
    r"(?i)(?:access(?:ibility|or)|access[_.-]?id|random[_.-]?access|api[_.-]?(?:id|name|version)"
    r"|rapid|capital|[a-z0-9-]*?api[a-z0-9-]*?:jar:|author|X-MS-Exchange-Organization-Auth"
    r"|Authentication-Results|(?:credentials?[_.-]?id|withCredentials)"
    r"|(?:bucket|foreign|hot|idx|natural|primary|pub(?:lic)?|schema|sequence)[_.-]?key|(?:turkey)"
    r"|key[_.-]?(?:alias|board|code|frame|id|length|mesh|name|pair|press(?:ed)?|ring|selector"
    r"|signature|size|stone|storetype|word|up|down|left|right)|key[_.-]?vault[_.-]?(?:id|name)"
    r"|keyVaultToStoreSecrets|key(?:store|tab)[_.-]?(?:file|path)|issuerkeyhash"
    r"|(?-i:[DdMm]onkey|[DM]ONKEY)|keying|(?:secret)[_.-]?(?:length|name|size)|UserSecretsId"
    r"|(?:csrf)[_.-]?token|(?:io\.jsonwebtoken[ \t]?:[ \t]?[\w-]+)"
    r"|(?:api|credentials|token)[_.-]?(?:endpoint|ur[il])|public[_.-]?token|(?:key|token)[_.-]?file"
    r"|(?-i:(?:[A-Z_]+=\n[A-Z_]+=|[a-z_]+=\n[a-z_]+=)(?:\n|\z))"
    r"|(?-i:(?:[A-Z.]+=\n[A-Z.]+=|[a-z.]+=\n[a-z.]+=)(?:\n|\z)))"
)

GENERIC_NAME_ALLOW = compile_go(_GENERIC_MATCH_ALLOW)

GENERIC_API_KEY = rule(
    "generic-api-key",
    semi(
        [
            *("access", "auth", "(?-i:[Aa]pi|API)", "credential", "creds", "key"),
            *("passw(?:or)?d", "secret", "token"),
        ],
        r"[\w.=-]{10,150}|[a-z0-9][a-z0-9+/]{11,}={0,3}",
    ),
    "access,api,auth,key,credential,creds,passwd,password,secret,token",
    entropy=3.5,
    generic=True,
    allowlists=[
        allow(r"^[a-zA-Z_.-]+$"),
        allow(_GENERIC_MATCH_ALLOW, target="match", stopwords=GENERIC_STOPWORDS),
        allow(
            r"--mount=type=secret,",
            r"""import[ \t]+{[ \t\w,]+}[ \t]+from[ \t]+['"][^'"]+['"]""",
            target="line",
        ),
        allow(
            r'LICENSE[^=]*=\s*"[^"]+',
            r'LIC_FILES_CHKSUM[^=]*=\s*"[^"]+',
            r'SRC[^=]*=\s*"[a-zA-Z0-9]+',
            target="line",
            paths=[r"\.bb$", r"\.bbappend$", r"\.bbclass$", r"\.inc$"],
            all_of=True,
        ),
    ],
)

_CURL_AUTH = (
    r"""(?i)(?:Authorization:[ \t]{0,5}(?:Basic[ \t]([a-z0-9+/]{8,}={0,3})"""
    r"""|(?:Bearer|(?:Api-)?Token)[ \t]([\w=~@.+/-]{8,})|([\w=~@.+/-]{8,}))"""
    r"""|(?:(?:X-(?:[a-z]+-)?)?(?:Api-?)?(?:Key|Token)):[ \t]{0,5}([\w=~@.+/-]{8,}))"""
)
_KUBE_VALUE = (
    r"""([\w.-]+:(?:[ \t]*(?:\||>[-+]?)\s+)?[ \t]*(?:["']?[a-z0-9+/]{10,}={0,3}["']?"""
    r"""|\{\{[ \t\w"|$:=,.-]+}}|""|''))"""
)
_K8S_KIND = r"""\bkind:[ \t]*["']?\bsecret\b["']?"""

# fmt: off
RULES: tuple[Rule, ...] = (
    rule("1password-secret-key",
         r"\bA3-[A-Z0-9]{6}-(?:(?:[A-Z0-9]{11})|(?:[A-Z0-9]{6}-[A-Z0-9]{5}))-[A-Z0-9]{5}-[A-Z0-9]{5}-[A-Z0-9]{5}\b",
         "a3-", entropy=3.8),
    rule("1password-service-account-token", r"ops_eyJ[a-zA-Z0-9+/]{250,}={0,3}", "ops_", entropy=4),
    _vendor("adafruit-api-key", ["adafruit"], r"[a-z0-9_-]{32}"),
    _vendor("adobe-client-id", ["adobe"], _hex("32"), entropy=2),
    rule("adobe-client-secret", uniq(r"p8e-(?i)[a-z0-9]{32}"), "p8e-", entropy=2),
    rule("age-secret-key", r"AGE-SECRET-KEY-1[QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L]{58}", "age-secret-key-1"),
    _vendor("airtable-api-key", ["airtable"], _alnum("17")),
    rule("airtable-personnal-access-token", r"\b(pat[[:alnum:]]{14}\.[a-f0-9]{64})\b", "airtable"),
    _vendor("algolia-api-key", ["algolia"], _alnum("32")),
    rule("alibaba-access-key-id", uniq(r"LTAI(?i)[a-z0-9]{20}"), "ltai", entropy=2),
    _vendor("alibaba-secret-key", ["alibaba"], _alnum("30"), entropy=2),
    rule("anthropic-admin-api-key", uniq(r"sk-ant-admin01-[a-zA-Z0-9_\-]{93}AA"), "sk-ant-admin01"),
    rule("anthropic-api-key", uniq(r"sk-ant-api03-[a-zA-Z0-9_\-]{93}AA"), "sk-ant-api03"),
    rule("artifactory-api-key", r"\bAKCp[A-Za-z0-9]{69}\b", "akcp", entropy=4.5),
    rule("artifactory-reference-token", r"\bcmVmd[A-Za-z0-9]{59}\b", "cmvmd", entropy=4.5),
    _vendor("asana-client-id", ["asana"], "[0-9]{16}"),
    _vendor("asana-client-secret", ["asana"], _alnum("32")),
    rule("atlassian-api-token",
         semi(["(?-i:ATLASSIAN|[Aa]tlassian)", "(?-i:CONFLUENCE|[Cc]onfluence)", "(?-i:JIRA|[Jj]ira)"],
              r"[a-z0-9]{20}[a-f0-9]{4}")
         + "|" + uniq(r"ATATT3[A-Za-z0-9_\-=]{186}"),
         "atlassian,confluence,jira,atatt3", entropy=3.5),
    rule("authress-service-client-access-key",
         uniq(r"(?:sc|ext|scauth|authress)_(?i)[a-z0-9]{5,30}\.[a-z0-9]{4,6}\.(?-i:acc)[_-][a-z0-9-]{10,32}\.[a-z0-9+/_=-]{30,120}"),
         "sc_,ext_,scauth_,authress_", entropy=2),
    rule("aws-access-token", r"\b((?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16})\b",
         "a3t,akia,asia,abia,acca", entropy=3, allowlists=[allow(r".+EXAMPLE$")]),
    rule("aws-amazon-bedrock-api-key-long-lived", uniq(r"ABSK[A-Za-z0-9+/]{109,269}={0,2}"), "absk", entropy=3),
    rule("aws-amazon-bedrock-api-key-short-lived", r"bedrock-api-key-(?:YmVkcm9jay5hbWF6b25hd3MuY29t)",
         "bedrock-api-key-"),
    rule("azure-ad-client-secret",
         r"""(?:^|[\\'"\x60\s>=:(,)])([a-zA-Z0-9_~.]{3}\dQ~[a-zA-Z0-9_~.-]{31,34})(?:$|[\\'"\x60\s<),])""",
         "q~", entropy=3),
    _vendor("beamer-api-token", ["beamer"], r"b_[a-z0-9=_\-]{44}"),
    _vendor("bitbucket-client-id", ["bitbucket"], _alnum("32")),
    _vendor("bitbucket-client-secret", ["bitbucket"], _ext("64")),
    _vendor("bittrex-access-key", ["bittrex"], _alnum("32")),
    _vendor("bittrex-secret-key", ["bittrex"], _alnum("32")),
    rule("cisco-meraki-api-key", semi(["(?-i:[Mm]eraki|MERAKI)"], "[0-9a-f]{40}", case_insensitive=False),
         "meraki", entropy=3),
    rule("clickhouse-cloud-api-secret-key", r"\b(4b1d[A-Za-z0-9]{38})\b", "4b1d", entropy=3),
    rule("clojars-api-token", r"(?i)CLOJARS_[a-z0-9]{60}", "clojars_", entropy=2),
    _vendor("cloudflare-api-key", ["cloudflare"], r"[a-z0-9_-]{40}", entropy=2),
    _vendor("cloudflare-global-api-key", ["cloudflare"], _hex("37"), entropy=2),
    rule("cloudflare-origin-ca-key", uniq(r"v1\.0-[a-f0-9]{24}-[a-f0-9]{146}"), "cloudflare,v1.0-", entropy=2),
    _vendor("codecov-access-token", ["codecov"], _alnum("32")),
    rule("cohere-api-token", semi(["cohere", "CO_API_KEY"], "[a-zA-Z0-9]{40}", case_insensitive=False),
         "cohere,co_api_key", entropy=4),
    _vendor("coinbase-access-token", ["coinbase"], r"[a-z0-9_-]{64}"),
    _vendor("confluent-access-token", ["confluent"], _alnum("16")),
    _vendor("confluent-secret-key", ["confluent"], _alnum("64")),
    _vendor("contentful-delivery-api-token", ["contentful"], _ext("43")),
    rule("curl-auth-header",
         r"""\bcurl\b(?:.*?|.*?(?:[\r\n]{1,2}.*?){1,5})[ \t\n\r](?:-H|--header)(?:=|[ \t]{0,5})"""
         rf"""(?:"{_CURL_AUTH}"|'{_CURL_AUTH}')(?:\B|\s|\z)""",
         "curl", entropy=2.75),
    rule("curl-auth-user",
         r"""\bcurl\b(?:.*|.*(?:[\r\n]{1,2}.*){1,5})[ \t\n\r](?:-u|--user)(?:=|[ \t]{0,5})"""
         r"""("(:[^"]{3,}|[^:"]{3,}:|[^:"]{3,}:[^"]{3,})"|'([^:']{3,}:[^']{3,})'"""
         r"""|((?:"[^"]{3,}"|'[^']{3,}'|[\w$@.-]+):(?:"[^"]{3,}"|'[^']{3,}'|[\w${}@.-]+)))(?:\s|\z)""",
         "curl", entropy=2,
         allowlists=[allow(
             r"[^:]+:(?:change(?:it|me)|pass(?:word)?|pwd|test|token|\*+|x+)",
             r"""['"]?<[^>]+>['"]?:['"]?<[^>]+>|<[^:]+:[^>]+>['"]?""",
             r"[^:]+:\[[^]]+]",
             r"""['"]?[^:]+['"]?:['"]?\$(?:\d|\w+|\{(?:\d|\w+)})['"]?""",
             r"\$\([^)]+\):\$\([^)]+\)",
             r"""['"]?\$?{{[^}]+}}['"]?:['"]?\$?{{[^}]+}}['"]?""",
         )]),
    rule("databricks-api-token", uniq(r"dapi[a-f0-9]{32}(?:-\d)?"), "dapi", entropy=3),
    _vendor("datadog-access-token", ["datadog"], _alnum("40")),
    _vendor("defined-networking-api-token", ["dnkey"], r"dnkey-[a-z0-9=_\-]{26}-[a-z0-9=_\-]{52}"),
    rule("digitalocean-access-token", uniq(r"doo_v1_[a-f0-9]{64}"), "doo_v1_", entropy=3),
    rule("digitalocean-pat", uniq(r"dop_v1_[a-f0-9]{64}"), "dop_v1_", entropy=3),
    rule("digitalocean-refresh-token", uniq(r"dor_v1_[a-f0-9]{64}", case_insensitive=True), "dor_v1_"),
    _vendor("discord-api-token", ["discord"], _hex("64")),
    _vendor("discord-client-id", ["discord"], "[0-9]{18}", entropy=2),
    _vendor("discord-client-secret", ["discord"], _ext("32"), entropy=2),
    rule("doppler-api-token", r"dp\.pt\.(?i)[a-z0-9]{43}", "dp.pt.", entropy=2),
    _vendor("droneci-access-token", ["droneci"], _alnum("32")),
    _vendor("dropbox-api-token", ["dropbox"], _alnum("15")),
    _vendor("dropbox-long-lived-api-token", ["dropbox"], r"[a-z0-9]{11}(AAAAAAAAAA)[a-z0-9\-_=]{43}"),
    _vendor("dropbox-short-lived-api-token", ["dropbox"], r"sl\.[a-z0-9\-=_]{135}"),
    rule("duffel-api-token", r"duffel_(?:test|live)_(?i)[a-z0-9_\-=]{43}", "duffel_", entropy=2),
    rule("dynatrace-api-token", r"dt0c01\.(?i)[a-z0-9]{24}\.[a-z0-9]{64}", "dt0c01.", entropy=4),
    rule("easypost-api-token", r"\bEZAK(?i)[a-z0-9]{54}\b", "ezak", entropy=2),
    rule("easypost-test-api-token", r"\bEZTK(?i)[a-z0-9]{54}\b", "eztk", entropy=2),
    _vendor("etsy-access-token", ["(?-i:ETSY|[Ee]tsy)"], _alnum("24"), "etsy", entropy=3),
    rule("facebook-access-token", uniq(r"\d{15,16}(\||%)[0-9a-z\-_]{27,40}", case_insensitive=True),
         "facebook", entropy=3),
    rule("facebook-page-access-token", uniq(r"EAA[MC](?i)[a-z0-9]{100,}"), "eaam,eaac", entropy=4),
    _vendor("facebook-secret", ["facebook"], _hex("32"), entropy=3),
    _vendor("fastly-api-token", ["fastly"], _ext("32")),
    _vendor("finicity-api-token", ["finicity"], _hex("32")),
    _vendor("finicity-client-secret", ["finicity"], _alnum("20")),
    _vendor("finnhub-access-token", ["finnhub"], _alnum("20")),
    _vendor("flickr-access-token", ["flickr"], _alnum("32")),
    rule("flutterwave-encryption-key", r"FLWSECK_TEST-(?i)[a-h0-9]{12}", "flwseck_test", entropy=2),
    rule("flutterwave-public-key", r"FLWPUBK_TEST-(?i)[a-h0-9]{32}-X", "flwpubk_test", entropy=2),
    rule("flutterwave-secret-key", r"FLWSECK_TEST-(?i)[a-h0-9]{32}-X", "flwseck_test", entropy=2),
    rule("flyio-access-token",
         uniq(r"(?:fo1_[\w-]{43}|fm1[ar]_[a-zA-Z0-9+\/]{100,}={0,3}|fm2_[a-zA-Z0-9+\/]{100,}={0,3})"),
         "fo1_,fm1,fm2_", entropy=4),
    rule("frameio-api-token", r"fio-u-(?i)[a-z0-9\-_=]{64}", "fio-u-"),
    rule("freemius-secret-key", r"""(?i)["']secret_key["']\s*=>\s*["'](sk_[\S]{29})["']""", "secret_key",
         path=r"(?i)\.php$"),
    _vendor("freshbooks-access-token", ["freshbooks"], _alnum("64")),
    rule("gcp-api-key", uniq(r"AIza[\w-]{35}"), "aiza", entropy=4, allowlists=[allow(
        "AIzaSyabcdefghijklmnopqrstuvwxyz1234567", "AIzaSyAnLA7NfeLquW1tJFpx_eQCxoX-oo6YyIs",
        "AIzaSyCkEhVjf3pduRDt6d1yKOMitrUEke8agEM", "AIzaSyDMAScliyLx7F0NPDEJi1QmyCgHIAODrlU",
        "AIzaSyD3asb-2pEZVqMkmL6M9N6nHZRR_znhrh0", "AIzayDNSXIbFmlXbIE6mCzDLQAqITYefhixbX4A",
        "AIzaSyAdOS2zB6NCsk1pCdZ4-P6GBdi_UUPwX7c", "AIzaSyASWm6HmTMdYWpgMnjRBjxcQ9CKctWmLd4",
        "AIzaSyANUvH9H9BsUccjsu2pCmEkOPjjaXeDQgY", "AIzaSyA5_iVawFQ8ABuTZNUdcwERLJv_a_p4wtM",
        "AIzaSyA4UrcGxgwQFTfaI3no3t7Lt1sjmdnP5sQ", "AIzaSyDSb51JiIcB6OJpwwMicseKRhhrOq1cS7g",
        "AIzaSyBF2RrAIm4a0mO64EShQfqfd2AFnzAvvuU", "AIzaSyBcE-OOIbhjyR83gm4r2MFCu4MJmprNXsw",
        "AIzaSyB8qGxt4ec15vitgn44duC5ucxaOi4FmqE", "AIzaSyA8vmApnrHNFE0bApF4hoZ11srVL_n0nvY",
    )]),
    rule("github-app-token", r"(?:ghu|ghs)_[0-9a-zA-Z]{36}", "ghu_,ghs_", entropy=3,
         allowlists=[allow(paths=[r"(?:^|/)@octokit/auth-token/README\.md$"])]),
    rule("github-fine-grained-pat", r"github_pat_\w{82}", "github_pat_", entropy=3),
    rule("github-oauth", r"gho_[0-9a-zA-Z]{36}", "gho_", entropy=3),
    rule("github-pat", r"ghp_[0-9a-zA-Z]{36}", "ghp_", entropy=3,
         allowlists=[allow(paths=[r"(?:^|/)@octokit/auth-token/README\.md$"])]),
    rule("github-refresh-token", r"ghr_[0-9a-zA-Z]{36}", "ghr_", entropy=3),
    rule("gitlab-cicd-job-token", r"glcbt-[0-9a-zA-Z]{1,5}_[0-9a-zA-Z_-]{20}", "glcbt-", entropy=3),
    rule("gitlab-deploy-token", r"gldt-[0-9a-zA-Z_\-]{20}", "gldt-", entropy=3),
    rule("gitlab-feature-flag-client-token", r"glffct-[0-9a-zA-Z_\-]{20}", "glffct-", entropy=3),
    rule("gitlab-feed-token", r"glft-[0-9a-zA-Z_\-]{20}", "glft-", entropy=3),
    rule("gitlab-incoming-mail-token", r"glimt-[0-9a-zA-Z_\-]{25}", "glimt-", entropy=3),
    rule("gitlab-kubernetes-agent-token", r"glagent-[0-9a-zA-Z_\-]{50}", "glagent-", entropy=3),
    rule("gitlab-oauth-app-secret", r"gloas-[0-9a-zA-Z_\-]{64}", "gloas-", entropy=3),
    rule("gitlab-pat", r"glpat-[\w-]{20}", "glpat-", entropy=3),
    rule("gitlab-pat-routable", r"\bglpat-[0-9a-zA-Z_-]{27,300}\.[0-9a-z]{2}[0-9a-z]{7}\b", "glpat-", entropy=4),
    rule("gitlab-ptt", r"glptt-[0-9a-f]{40}", "glptt-", entropy=3),
    rule("gitlab-rrt", r"GR1348941[\w-]{20}", "gr1348941", entropy=3),
    rule("gitlab-runner-authentication-token", r"glrt-[0-9a-zA-Z_\-]{20}", "glrt-", entropy=3),
    rule("gitlab-runner-authentication-token-routable",
         r"\bglrt-t\d_[0-9a-zA-Z_\-]{27,300}\.[0-9a-z]{2}[0-9a-z]{7}\b", "glrt-", entropy=4),
    rule("gitlab-scim-token", r"glsoat-[0-9a-zA-Z_\-]{20}", "glsoat-", entropy=3),
    rule("gitlab-session-cookie", r"_gitlab_session=[0-9a-z]{32}", "_gitlab_session=", entropy=3),
    _vendor("gitter-access-token", ["gitter"], r"[a-z0-9_-]{40}"),
    _vendor("gocardless-api-token", ["gocardless"], r"live_(?i)[a-z0-9\-_=]{40}", "live_,gocardless"),
    rule("grafana-api-key", uniq(r"eyJrIjoi[A-Za-z0-9]{70,400}={0,3}", case_insensitive=True), "eyjrijoi",
         entropy=3),
    rule("grafana-cloud-api-token", uniq(r"glc_[A-Za-z0-9+/]{32,400}={0,3}", case_insensitive=True), "glc_",
         entropy=3),
    rule("grafana-service-account-token", uniq(r"glsa_[A-Za-z0-9]{32}_[A-Fa-f0-9]{8}", case_insensitive=True),
         "glsa_", entropy=3),
    rule("harness-api-key", r"(?:pat|sat)\.[a-zA-Z0-9_-]{22}\.[a-zA-Z0-9]{24}\.[a-zA-Z0-9]{20}", "pat.,sat."),
    rule("hashicorp-tf-api-token", r"(?i)[a-z0-9]{14}\.(?-i:atlasv1)\.[a-z0-9\-_=]{60,70}", "atlasv1",
         entropy=3.5),
    rule("hashicorp-tf-password", semi(["administrator_login_password", "password"], r'"[a-z0-9=_\-]{8,20}"'),
         "administrator_login_password,password", entropy=2, path=r"(?i)\.(?:tf|hcl)$"),
    _vendor("heroku-api-key", ["heroku"], UUID),
    rule("heroku-api-key-v2", uniq(r"(HRKU-AA[0-9a-zA-Z_-]{58})"), "hrku-aa", entropy=4),
    _vendor("hubspot-api-key", ["hubspot"], UUID.replace("a-f", "A-F")),
    rule("huggingface-access-token", uniq(r"hf_(?i:[a-z]{34})"), "hf_", entropy=2),
    rule("huggingface-organization-api-token", uniq(r"api_org_(?i:[a-z]{34})"), "api_org_", entropy=2),
    rule("infracost-api-token", uniq(r"ico-[a-zA-Z0-9]{32}"), "ico-", entropy=3),
    _vendor("intercom-api-key", ["intercom"], _ext("60")),
    rule("intra42-client-secret", uniq(r"s-s4t2(?:ud|af)-(?i)[abcdef0123456789]{64}"),
         "intra,s-s4t2ud-,s-s4t2af-", entropy=3),
    _vendor("jfrog-api-key", _JFROG, _alnum("73")),
    _vendor("jfrog-identity-token", _JFROG, _alnum("64")),
    rule("jwt", uniq(r"ey[a-zA-Z0-9]{17,}\.ey[a-zA-Z0-9\/\\_-]{17,}\.(?:[a-zA-Z0-9\/\\_-]{10,}={0,2})?"), "ey",
         entropy=3),
    rule("jwt-base64",
         r"\bZXlK(?:aGJHY2lPaU|aGNIVWlPaU|aGNIWWlPaU|aGRXUWlPaU|aU5qUWlP|amNtbDBJanBi|amRIa2lPaU"
         r"|bGNHc2lPbn|bGJtTWlPaU|cWEzVWlPaU|cWQyc2lPb|cGMzTWlPaU|cGRpSTZJ|cmFXUWlP|clpYbGZiM0J6SWpwY"
         r"|cmRIa2lPaUp|dWIyNWpaU0k2|d01tTWlP|d01uTWlPaU|d2NIUWlPaU|emRXSWlPaU|emRuUWlP|MFlXY2lPaU"
         r"|MGVYQWlPaUp|MWNtd2l|MWMyVWlPaUp|MlpYSWlPaU|MlpYSnphVzl1SWpv|NElqb2|NE5XTWlP|NE5YUWlPaU"
         r"|NE5YUWpVekkxTmlJNkl|NE5YVWlPaU|NmFYQWlPaU)[a-zA-Z0-9\/\\_+\-\r\n]{40,}={0,2}",
         "zxlk", entropy=2),
    _vendor("kraken-access-token", ["kraken"], r"[a-z0-9\/=_\+\-]{80,90}"),
    rule("kubernetes-secret-yaml",
         rf"(?i)(?:{_K8S_KIND}(?s:.){{0,200}}?\bdata:(?s:.){{0,100}}?\s+{_KUBE_VALUE}"
         rf"|\bdata:(?s:.){{0,100}}?\s+{_KUBE_VALUE}(?s:.){{0,200}}?{_K8S_KIND})",
         "secret", path=r"(?i)\.ya?ml$",
         allowlists=[
             allow(r"""[\w.-]+:(?:[ \t]*(?:\||>[-+]?)\s+)?[ \t]*(?:\{\{[ \t\w"|$:=,.-]+}}|""|'')"""),
             allow(r"(kind:(?s:.)+\n---\n(?s:.)+\bdata:|data:(?s:.)+\n---\n(?s:.)+\bkind:)", target="match"),
         ]),
    _vendor("kucoin-access-token", ["kucoin"], _hex("24")),
    _vendor("kucoin-secret-key", ["kucoin"], UUID),
    _vendor("launchdarkly-access-token", ["launchdarkly"], _ext("40")),
    rule("linear-api-key", r"lin_api_(?i)[a-z0-9]{40}", "lin_api_", entropy=2),
    _vendor("linear-client-secret", ["linear"], _hex("32"), entropy=2),
    _vendor("linkedin-client-id", ["linked[_-]?in"], _alnum("14"), "linkedin,linked_in,linked-in", entropy=2),
    _vendor("linkedin-client-secret", ["linked[_-]?in"], _alnum("16"), "linkedin,linked_in,linked-in",
            entropy=2),
    _vendor("lob-api-key", ["lob"], r"(live|test)_[a-f0-9]{35}", "test_,live_"),
    _vendor("lob-pub-api-key", ["lob"], r"(test|live)_pub_[a-f0-9]{31}", "test_pub,live_pub,_pub"),
    _vendor("looker-client-id", ["looker"], _alnum("20")),
    _vendor("looker-client-secret", ["looker"], _alnum("24")),
    _vendor("mailchimp-api-key", ["MailchimpSDK.initialize", "mailchimp"], r"[a-f0-9]{32}-us\d\d", "mailchimp"),
    _vendor("mailgun-private-api-token", ["mailgun"], r"key-[a-f0-9]{32}"),
    _vendor("mailgun-pub-key", ["mailgun"], r"pubkey-[a-f0-9]{32}"),
    _vendor("mailgun-signing-key", ["mailgun"], r"[a-h0-9]{32}-[a-h0-9]{8}-[a-h0-9]{8}"),
    _vendor("mapbox-api-token", ["mapbox"], r"pk\.[a-z0-9]{60}\.[a-z0-9]{22}"),
    _vendor("mattermost-access-token", ["mattermost"], _alnum("26")),
    rule("maxmind-license-key", uniq(r"[A-Za-z0-9]{6}_[A-Za-z0-9]{29}_mmk"), "_mmk", entropy=4),
    _vendor("messagebird-api-token", ["message[_-]?bird"], _alnum("25"), "messagebird,message-bird,message_bird"),
    _vendor("messagebird-client-id", ["message[_-]?bird"], UUID, "messagebird,message-bird,message_bird"),
    rule("microsoft-teams-webhook",
         r"https://[a-z0-9]+\.webhook\.office\.com/webhookb2/[a-z0-9]{8}-(?:[a-z0-9]{4}-){3}[a-z0-9]{12}"
         r"@[a-z0-9]{8}-(?:[a-z0-9]{4}-){3}[a-z0-9]{12}/IncomingWebhook/[a-z0-9]{32}"
         r"/[a-z0-9]{8}-(?:[a-z0-9]{4}-){3}[a-z0-9]{12}",
         "webhook.office.com,webhookb2,incomingwebhook"),
    _vendor("netlify-access-token", ["netlify"], r"[a-z0-9=_\-]{40,46}"),
    _vendor("new-relic-browser-api-token", _NEW_RELIC, r"NRJS-[a-f0-9]{19}", "nrjs-"),
    _vendor("new-relic-insert-key", _NEW_RELIC, r"NRII-[a-z0-9-]{32}", "nrii-"),
    _vendor("new-relic-user-api-id", _NEW_RELIC, _alnum("64")),
    _vendor("new-relic-user-api-key", _NEW_RELIC, r"NRAK-[a-z0-9]{27}", "nrak"),
    rule("notion-api-token", uniq(r"ntn_[0-9]{11}[A-Za-z0-9]{32}[A-Za-z0-9]{3}"), "ntn_", entropy=4),
    rule("npm-access-token", uniq(r"npm_[a-z0-9]{36}", case_insensitive=True), "npm_", entropy=2),
    rule("nuget-config-password", r'(?i)<add key=\"(?:(?:ClearText)?Password)\"\s*value=\"(.{8,})\"\s*/>',
         "<add key=", entropy=1, path=r"(?i)nuget\.config$",
         allowlists=[allow(r"33f!!lloppa", r"hal\+9ooo_da!sY", r"^\%\S.*\%$")]),
    _vendor("nytimes-access-token", ["nytimes", "new-york-times,", "newyorktimes"], _ext("32"),
            "nytimes,new-york-times,newyorktimes"),
    rule("octopus-deploy-api-key", uniq(r"API-[A-Z0-9]{26}"), "api-", entropy=3),
    rule("okta-access-token", semi(["(?-i:[Oo]kta|OKTA)"], r"00[\w=\-]{40}", case_insensitive=False), "okta",
         entropy=4),
    rule("openai-api-key",
         uniq(r"sk-(?:proj|svcacct|admin)-(?:[A-Za-z0-9_-]{74}|[A-Za-z0-9_-]{58})T3BlbkFJ"
              r"(?:[A-Za-z0-9_-]{74}|[A-Za-z0-9_-]{58})\b|sk-[a-zA-Z0-9]{20}T3BlbkFJ[a-zA-Z0-9]{20}"),
         "t3blbkfj", entropy=3),
    rule("openshift-user-token", r"\b(sha256~[\w-]{43})(?:[^\w-]|\z)", "sha256~", entropy=3.5),
    rule("perplexity-api-key", r"""\b(pplx-[a-zA-Z0-9]{48})(?:[\x60'"\s;]|\\[nr]|$|\b)""", "pplx-", entropy=4),
    _vendor("plaid-api-token", ["plaid"], rf"access-(?:sandbox|development|production)-{UUID}"),
    _vendor("plaid-client-id", ["plaid"], _alnum("24"), entropy=3.5),
    _vendor("plaid-secret-key", ["plaid"], _alnum("30"), entropy=3.5),
    rule("planetscale-api-token", uniq(r"pscale_tkn_(?i)[\w=\.-]{32,64}"), "pscale_tkn_", entropy=3),
    rule("planetscale-oauth-token", uniq(r"pscale_oauth_[\w=\.-]{32,64}"), "pscale_oauth_", entropy=3),
    rule("planetscale-password", uniq(r"pscale_pw_(?i)[\w=\.-]{32,64}", case_insensitive=True), "pscale_pw_",
         entropy=3),
    rule("postman-api-token", uniq(r"PMAK-(?i)[a-f0-9]{24}\-[a-f0-9]{34}"), "pmak-", entropy=3),
    rule("prefect-api-token", uniq(r"pnu_[a-zA-Z0-9]{36}"), "pnu_", entropy=2),
    rule("private-key",
         r"(?i)-----BEGIN[ A-Z0-9_-]{0,100}PRIVATE KEY(?: BLOCK)?-----[\s\S-]{64,65536}?KEY(?: BLOCK)?-----",
         "-----begin"),
    rule("privateai-api-token", semi(["private[_-]?ai"], _alnum("32"), case_insensitive=False),
         "privateai,private_ai,private-ai", entropy=3),
    rule("pulumi-api-token", uniq(r"pul-[a-f0-9]{40}"), "pul-", entropy=2),
    rule("pypi-upload-token", r"pypi-AgEIcHlwaS5vcmc[\w-]{50,1000}", "pypi-ageichlwas5vcmc", entropy=3),
    _vendor("rapidapi-access-token", ["rapidapi"], r"[a-z0-9_-]{50}"),
    rule("readme-api-token", uniq(r"rdme_[a-z0-9]{70}"), "rdme_", entropy=2),
    rule("rubygems-api-token", uniq(r"rubygems_[a-f0-9]{48}"), "rubygems_", entropy=2),
    rule("scalingo-api-token", uniq(r"tk-us-[\w-]{48}"), "tk-us-", entropy=2),
    _vendor("sendbird-access-id", ["sendbird"], UUID),
    _vendor("sendbird-access-token", ["sendbird"], _hex("40")),
    rule("sendgrid-api-token", uniq(r"SG\.(?i)[a-z0-9=_\-\.]{66}"), "sg.", entropy=2),
    rule("sendinblue-api-token", uniq(r"xkeysib-[a-f0-9]{64}\-(?i)[a-z0-9]{16}"), "xkeysib-", entropy=2),
    _vendor("sentry-access-token", ["sentry"], _hex("64"), entropy=3),
    rule("sentry-org-token",
         r"\bsntrys_eyJpYXQiO[a-zA-Z0-9+/]{10,200}(?:LCJyZWdpb25fdXJs|InJlZ2lvbl91cmwi|cmVnaW9uX3VybCI6)"
         r"[a-zA-Z0-9+/]{10,200}={0,2}_[a-zA-Z0-9+/]{43}(?:[^a-zA-Z0-9+/]|\z)",
         "sntrys_eyjpyxqio", entropy=4.5),
    rule("sentry-user-token", uniq(r"sntryu_[a-f0-9]{64}"), "sntryu_", entropy=3.5),
    rule("settlemint-application-access-token", uniq(r"sm_aat_[a-zA-Z0-9]{16}"), "sm_aat", entropy=3),
    rule("settlemint-personal-access-token", uniq(r"sm_pat_[a-zA-Z0-9]{16}"), "sm_pat", entropy=3),
    rule("settlemint-service-access-token", uniq(r"sm_sat_[a-zA-Z0-9]{16}"), "sm_sat", entropy=3),
    rule("shippo-api-token", uniq(r"shippo_(?:live|test)_[a-fA-F0-9]{40}"), "shippo_", entropy=2),
    rule("shopify-access-token", r"shpat_[a-fA-F0-9]{32}", "shpat_", entropy=2),
    rule("shopify-custom-access-token", r"shpca_[a-fA-F0-9]{32}", "shpca_", entropy=2),
    rule("shopify-private-app-access-token", r"shppa_[a-fA-F0-9]{32}", "shppa_", entropy=2),
    rule("shopify-shared-secret", r"shpss_[a-fA-F0-9]{32}", "shpss_", entropy=2),
    _vendor("sidekiq-secret", ["BUNDLE_ENTERPRISE__CONTRIBSYS__COM", "BUNDLE_GEMS__CONTRIBSYS__COM"],
            r"[a-f0-9]{8}:[a-f0-9]{8}"),
    rule("sidekiq-sensitive-url",
         r"(?i)\bhttps?://([a-f0-9]{8}:[a-f0-9]{8})@(?:gems.contribsys.com|enterprise.contribsys.com)(?:[\/|\#|\?|:]|$)",
         "gems.contribsys.com,enterprise.contribsys.com"),
    rule("slack-app-token", r"(?i)xapp-\d-[A-Z0-9]+-\d+-[a-z0-9]+", "xapp", entropy=2),
    rule("slack-bot-token", r"xoxb-[0-9]{10,13}-[0-9]{10,13}[a-zA-Z0-9-]*", "xoxb", entropy=3),
    rule("slack-config-access-token", r"(?i)xoxe.xox[bp]-\d-[A-Z0-9]{163,166}", "xoxe.xoxb-,xoxe.xoxp-",
         entropy=2),
    rule("slack-config-refresh-token", r"(?i)xoxe-\d-[A-Z0-9]{146}", "xoxe-", entropy=2),
    rule("slack-legacy-bot-token", r"xoxb-[0-9]{8,14}-[a-zA-Z0-9]{18,26}", "xoxb", entropy=2),
    rule("slack-legacy-token", r"xox[os]-\d+-\d+-\d+-[a-fA-F\d]+", "xoxo,xoxs", entropy=2),
    rule("slack-legacy-workspace-token", r"xox[ar]-(?:\d-)?[0-9a-zA-Z]{8,48}", "xoxa,xoxr", entropy=2),
    rule("slack-user-token", r"xox[pe](?:-[0-9]{10,13}){3}-[a-zA-Z0-9-]{28,34}", "xoxp-,xoxe-", entropy=2),
    rule("slack-webhook-url", r"(?:https?://)?hooks.slack.com/(?:services|workflows|triggers)/[A-Za-z0-9+/]{43,56}",
         "hooks.slack.com"),
    _vendor("snyk-api-token", ["snyk[_.-]?(?:(?:api|oauth)[_.-]?)?(?:key|token)"], UUID, "snyk"),
    rule("sonar-api-token", semi(["sonar[_.-]?(login|token)"], _ext("40")), "sonar", group=2),
    rule("sourcegraph-access-token",
         uniq(r"\b(sgp_(?:[a-fA-F0-9]{16}|local)_[a-fA-F0-9]{40}|sgp_[a-fA-F0-9]{40}|[a-fA-F0-9]{40})\b",
              case_insensitive=True),
         "sgp_,sourcegraph", entropy=3),
    rule("square-access-token", uniq(r"(?:EAAA|sq0atp-)[\w-]{22,60}"), "sq0atp-,eaaa", entropy=2),
    # From gitleaks releases before v8.19 (dropped there as a duplicate, kept here for recall).
    rule("square-secret", uniq(r"sq0csp-[0-9A-Za-z\-_]{43}", case_insensitive=True), "sq0csp-", entropy=2),
    _vendor("squarespace-access-token", ["squarespace"], UUID),
    rule("stripe-access-token", uniq(r"(?:sk|rk)_(?:test|live|prod)_[a-zA-Z0-9]{10,99}"),
         "sk_test,sk_live,sk_prod,rk_test,rk_live,rk_prod", entropy=2),
    rule("sumologic-access-id", semi(_SUMO, r"su[a-zA-Z0-9]{12}", case_insensitive=False), "sumo", entropy=3),
    _vendor("sumologic-access-token", _SUMO, _alnum("64"), "sumo", entropy=3),
    _vendor("telegram-bot-api-token", ["telegr"], r"[0-9]{5,16}:(?-i:A)[a-z0-9_\-]{34}"),
    _vendor("travisci-access-token", ["travis"], _alnum("22")),
    rule("twilio-api-key", r"SK[0-9a-fA-F]{32}", "sk", entropy=3),
    _vendor("twitch-api-token", ["twitch"], _alnum("30")),
    _vendor("twitter-access-secret", ["twitter"], _alnum("45")),
    _vendor("twitter-access-token", ["twitter"], r"[0-9]{15,25}-[a-zA-Z0-9]{20,40}"),
    _vendor("twitter-api-key", ["twitter"], _alnum("25")),
    _vendor("twitter-api-secret", ["twitter"], _alnum("50")),
    _vendor("twitter-bearer-token", ["twitter"], r"A{22}[a-zA-Z0-9%]{80,100}"),
    _vendor("typeform-api-token", ["typeform"], r"tfp_[a-z0-9\-_\.=]{59}", "tfp_"),
    rule("vault-batch-token", uniq(r"hvb\.[\w-]{138,300}"), "hvb.", entropy=4),
    rule("vault-service-token", uniq(r"(?:hvs\.[\w-]{90,120}|s\.(?i:[a-z0-9]{24}))"), "hvs.,s.", entropy=3.5,
         allowlists=[allow(r"s\.[A-Za-z]{24}")]),
    _vendor("yandex-access-token", ["yandex"], r"t1\.[A-Z0-9a-z_-]+[=]{0,2}\.[A-Z0-9a-z_-]{86}[=]{0,2}"),
    _vendor("yandex-api-key", ["yandex"], r"AQVN[A-Za-z0-9_\-]{35,38}"),
    _vendor("yandex-aws-access-token", ["yandex"], r"YC[a-zA-Z0-9_\-]{38}"),
    _vendor("zendesk-secret-key", ["zendesk"], _alnum("40")),
    GENERIC_API_KEY,
)
# fmt: on
