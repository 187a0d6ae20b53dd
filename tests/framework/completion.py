"""The bash side of completion tests: source qvm's script, complete one line."""

# complete LINE: what bash offers after the function ran, one candidate per line
BASH_DRIVER = r"""
source <("$QVM" --show-completion bash) || exit 90
complete_line() {
    COMP_LINE="$1"; COMP_POINT=${#1}
    local IFS=$' \t\n'
    # split as readline does: at blanks, and at each character of COMP_WORDBREAKS
    local line="$1" word="" ch
    COMP_WORDS=()
    for ((i = 0; i < ${#line}; i++)); do
        ch="${line:i:1}"
        if [[ "$ch" == " " ]]; then
            [[ -n "$word" ]] && COMP_WORDS+=("$word"); word=""
        elif [[ "$ch" == ":" || "$ch" == "=" ]]; then
            [[ -n "$word" ]] && COMP_WORDS+=("$word"); COMP_WORDS+=("$ch"); word=""
        else
            word+="$ch"
        fi
    done
    COMP_WORDS+=("$word")
    COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
    COMPREPLY=()
    _qvm_completion qvm "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
    printf '%s\n' "${COMPREPLY[@]}"
}
complete_line "$LINE"
"""
