# The Debian package sources of this machine's own apt configuration, for
# the fetch scripts' private apt states: no mirror is written into the
# project, the operator's choice (a mirror, a proxy, a snapshot) is used.
# Sourced by lib.sh.

# Every enabled `deb` source as "URI SUITE SIGNED-BY" lines (SIGNED-BY "-"
# when none), from sources.list and sources.list.d/*.list (one-line format)
# and sources.list.d/*.sources (deb822), under $APT_ETC (default /etc/apt).
apt_source_files() {
    local etc="${APT_ETC:-/etc/apt}" f
    for f in "$etc/sources.list" "$etc"/sources.list.d/*.list "$etc"/sources.list.d/*.sources; do
        [[ -f "$f" ]] && printf '%s\n' "$f"
    done
    return 0
}

apt_source_records() {
    local files=()
    mapfile -t files < <(apt_source_files)
    ((${#files[@]})) || return 0
    awk '
    function flush(   i, j, nu, ns, u, s) {
        nu = split(uris, u, /[ \t]+/); ns = split(suites, s, /[ \t]+/)
        # An embedded key (a block, not a path) is left to the default keyrings.
        if (key ~ /BEGIN PGP/ || key == "") key = "-"
        if (types ~ /(^| )deb( |$)/ && enabled != "no")
            for (i = 1; i <= nu; i++) for (j = 1; j <= ns; j++) if (u[i] != "" && s[j] != "") print u[i], s[j], key
        types = ""; enabled = ""; key = ""; uris = ""; suites = ""; last = ""
    }
    FNR == 1 { if (deb822) flush(); deb822 = (FILENAME ~ /\.sources$/) }
    /^[ \t]*#/ { next }
    !deb822 {
        if ($1 != "deb") next
        k = "-"; n = 2
        if ($2 ~ /^\[/) {
            # Options: [arch=amd64 signed-by=/path], possibly over several fields.
            opts = ""
            for (n = 2; n <= NF; n++) { opts = opts " " $n; if ($n ~ /\]$/) { n++; break } }
            gsub(/[\[\]]/, "", opts)
            m = split(opts, o, " ")
            for (x = 1; x <= m; x++) if (o[x] ~ /^signed-by=/) { k = o[x]; sub(/^signed-by=/, "", k) }
        }
        if (n + 1 <= NF) print $n, $(n + 1), k
        next
    }
    /^[ \t]*$/ { flush(); next }
    /^[ \t]/ {
        # A continuation of the field before (a list, or an embedded key).
        if (last == "uris") uris = uris " " $0
        else if (last == "suites") suites = suites " " $0
        else if (last == "signed-by") key = key " " $0
        next
    }
    {
        field = tolower($1); sub(/:$/, "", field); last = field
        $1 = ""; sub(/^[ \t]+/, "")
        if (field == "types") types = $0
        else if (field == "enabled") enabled = tolower($0)
        else if (field == "signed-by") key = $0
        else if (field == "uris") uris = $0
        else if (field == "suites") suites = $0
    }
    END { if (deb822) flush() }
    ' "${files[@]}"
}

# One-line apt sources for the Debian suites asked for (main component),
# each from this machine's configuration: a suite it lists is used as is;
# one it lacks but whose archive it has (bookworm-backports beside
# bookworm) comes from that archive. The first suite is required: without
# a source for it the error names the files read. Prints the lines.
debian_sources() {
    local records etc="${APT_ETC:-/etc/apt}"
    records="$(apt_source_records)"
    local base="$1" line want uri suite key out=()
    for want in "$@"; do
        line="$(awk -v s="$want" '$2 == s { print; exit }' <<<"$records")"
        if [[ -z "$line" && "$want" == "$base"-* && "$want" != *-security ]]; then
            # The same archive as the base suite.
            line="$(awk -v s="$base" -v w="$want" '$2 == s { print $1, w, $3; exit }' <<<"$records")"
        fi
        if [[ -z "$line" ]]; then
            if [[ "$want" == "$base" ]]; then
                local files_read
                files_read="$(apt_source_files | tr '\n' ' ')"
                die "no apt source for Debian '$base' in this machine's apt configuration (read: ${files_read:-no sources.list, sources.list.d/*.list or *.sources under $etc})"
            fi
            say "no apt source for '$want' here: left out"
            continue
        fi
        read -r uri suite key <<<"$line"
        if [[ "$key" == "-" ]]; then
            out+=("deb $uri $suite main")
        else
            out+=("deb [signed-by=$key] $uri $suite main")
        fi
    done
    printf '%s\n' "${out[@]}"
}
